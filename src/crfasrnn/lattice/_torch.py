"""Splat, blur and slice with vectorised torch operations (the CUDA path, and the CPU path without numba)."""

from __future__ import annotations

import torch

from ._build import LatticeStructure

__all__ = ["filter_points"]


def filter_points(lattice: LatticeStructure, values: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Filter point values through the lattice.

    Args:
        lattice: the built lattice over P points.
        values: (P, C) values, one row per point.
        reverse: blur the axes in reverse order (the transpose of the forward filter).

    Returns:
        (P, C) unnormalised filtered values.
    """
    d = lattice.dim
    num_channels = values.shape[1]
    grid = values.new_zeros(lattice.num_vertices + 1, num_channels)  # last row: the empty vertex
    for r in range(d + 1):
        grid.index_add_(0, lattice.offsets[:, r], values * lattice.weights[:, r : r + 1])
    axes = range(d, -1, -1) if reverse else range(d + 1)
    for j in axes:
        n1, n2 = lattice.blur_neighbours[j]
        grid = grid + 0.5 * (grid[n1] + grid[n2])
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    out = grid[lattice.offsets[:, 0]] * (lattice.weights[:, 0:1] * alpha)
    for r in range(1, d + 1):
        out += grid[lattice.offsets[:, r]] * (lattice.weights[:, r : r + 1] * alpha)
    return out
