"""Helpers shared by the tests (importable as ``helpers``: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def pixel_grid(height: int, width: int, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(xs, ys): column and row index of every pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device), torch.arange(width, dtype=dtype, device=device), indexing="ij"
    )
    return xs, ys


def train_one_and_two_processes(args: list[str], out: Path, batch_size: int) -> tuple[Path, Path]:
    """``crfasrnn train *args`` as one process with ``batch_size`` and under torchrun as 2 gloo processes with half of
    it (one thread each), into ``out/one`` and ``out/two``; asserts both succeed and returns the two folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "crfasrnn", "train", *args, "--batch-size", str(batch_size), "--out", str(out / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "crfasrnn",
           "train", *args, "--batch-size", str(batch_size // 2), "--out", str(out / "two")]  # fmt: skip
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    return out / "one", out / "two"
