"""Splat, blur and slice with vectorised torch operations (the CUDA path, and the CPU path without numba)."""

from __future__ import annotations

import torch

from ._build import LatticeStructure

__all__ = ["filter_points"]


def filter_points(
    lattice: LatticeStructure,
    values: torch.Tensor,
    reverse: bool,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Filter point values through the lattice: ``post ⊙ K (pre ⊙ values)``.

    Args:
        lattice: the built lattice over P points.
        values: (P, C) values, one row per point.
        reverse: blur the axes in reverse order (the transpose of the forward filter).
        pre_scale, post_scale: optional (P,) or (P, 1) per-point factors applied before splatting / after slicing.

    Returns:
        (P, C) filtered values.
    """
    if pre_scale is not None:
        values = values * pre_scale.reshape(-1, 1)
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
    if post_scale is not None:
        out = out * post_scale.reshape(-1, 1)
    return out
