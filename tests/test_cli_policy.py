"""The command line's error policy: the user's mistakes are one line and exit 1; bugs keep their traceback."""

from __future__ import annotations

import pytest
import torch

from crfasrnn import cli
from crfasrnn._checks import InputTypeError


def _failing(exc: BaseException):
    def command(args) -> int:
        raise exc

    return command


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value\nover two lines"),
        InputTypeError("labels must be integers"),
        FileNotFoundError("weights file not found: x.pth"),
        PermissionError("cannot write out.png"),
    ],
    ids=["ValueError", "InputTypeError", "FileNotFoundError", "PermissionError"],
)
def test_user_mistakes_are_one_line(monkeypatch, capsys, exc):
    monkeypatch.setattr(cli, "_convert", _failing(exc))
    assert cli.main(["convert", "a.caffemodel", "b.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("crfasrnn convert: error: ")
    assert " ".join(str(exc).split()) in err


@pytest.mark.parametrize("exc", [ValueError("bad value"), InputTypeError("wrong dtype")])
def test_verbose_shows_the_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "_convert", _failing(exc))
    with pytest.raises(type(exc), match=str(exc)):
        cli.main(["-v", "convert", "a.caffemodel", "b.safetensors"])


@pytest.mark.parametrize(
    "exc",
    [TypeError("unsupported operand type(s)"), RuntimeError("a kernel failed"), KeyError("x"), AttributeError("y")],
    ids=["TypeError", "RuntimeError", "KeyError", "AttributeError"],
)
def test_internal_errors_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "_convert", _failing(exc))
    with pytest.raises(type(exc)):
        cli.main(["convert", "a.caffemodel", "b.safetensors"])


@pytest.mark.parametrize(
    "exc", [MemoryError("cannot allocate"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")]
)
def test_out_of_memory_is_named(monkeypatch, capsys, exc):
    monkeypatch.setattr(cli, "_convert", _failing(exc))
    assert cli.main(["convert", "a.caffemodel", "b.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: out of memory" in err
    assert type(exc).__name__ in err
