"""Training checkpoints, written atomically: a temporary file in the same folder, flushed and fsync'ed, then renamed
over the old one (and the folder fsync'ed), so that a crash or kill at any moment leaves the last good checkpoint
intact.

A checkpoint is a plain dict (``torch.save`` format, readable with ``weights_only=True``): ``model``, ``optimizer``,
``scheduler`` (state dicts), ``epoch`` (completed epochs), ``step`` (optimizer steps), ``rng`` (RNG states) and
``args`` (the training options).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into a binary file object, atomically (:func:`crfasrnn.files.atomic_write`)."""

    def to_path(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temporary name, fsync, rename)."""
    _atomic_write(Path(path), lambda f: f.write(data))


def rng_state() -> dict[str, Any]:
    """The RNG states training depends on: torch (CPU and every CUDA device) and Python's ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` ``state`` to ``path`` atomically.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "last.pt"
        >>> save_checkpoint({"epoch": 1, "model": {"w": torch.ones(2)}}, path)
        >>> load_checkpoint(path)["model"]["w"]
        tensor([1., 1.])
    """
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs from the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint (truncated, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises assorted errors for damaged files
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a training checkpoint (holds a {type(state).__name__})")  # noqa: TRY004 (what a file holds: a bad file, not a bad argument)
    return state


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """The bytes ``torch.save`` writes for ``state`` (for tests comparing checkpoints)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
