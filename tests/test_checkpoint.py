"""Atomic checkpoints: an interrupted write never damages the last good file; RNG states round-trip; plots."""

from __future__ import annotations

import random

import pytest
import torch

from crfasrnn import checkpoint as ckpt
from crfasrnn.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_interrupted_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.arange(3.0)}, path)
    good = path.read_bytes()

    def dying_save(obj, f):  # writes half a file, then the process "is killed"
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_damaged_or_foreign_files_are_clear_errors(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(2), path)
    with pytest.raises(ValueError, match="is not a training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    save_checkpoint({"rng": rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(4), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(4), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    from crfasrnn.plots import plot_curves

    records = [
        {"kind": "epoch", "epoch": 1, "train_loss": 1.0, "val_miou": 0.3, "val_miou_fcn": 0.25},
        {"kind": "step", "step": 5, "loss": 0.9},
        {"kind": "epoch", "epoch": 2, "train_loss": 0.5, "val_miou": 0.5, "val_miou_fcn": 0.45},
    ]
    plot_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
