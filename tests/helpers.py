"""Helpers shared by the tests (importable as ``helpers``: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import torch


def pixel_grid(height: int, width: int, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(xs, ys): column and row index of every pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device), torch.arange(width, dtype=dtype, device=device), indexing="ij"
    )
    return xs, ys
