"""The permutohedral lattice: fast approximate high-dimensional Gaussian filtering (Adams et al., 2010).

This is the lattice of the CRF-RNN reference implementations (Krähenbühl's dense-CRF ``permutohedral.cpp`` as modified
for CRF-RNN, see docs/reference.md §3): features are elevated onto the hyperplane of a (d+1)-dimensional lattice, every
point is splatted with barycentric weights onto the d+1 vertices of its enclosing simplex, the lattice is blurred with
the unnormalised kernel [1/2, 1, 1/2] along each of its d+1 axes in turn, and the values are sliced back with the same
weights, scaled by 1 / (1 + 2^-d). The result approximates ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up to a constant.

Differences from the reference, both of which leave the results within float32 rounding of it:

* the reference pads the points to a multiple of 4 with zero feature vectors whose simplex vertices enter its hash table
  (the "phantom-vertex quirk", docs/reference.md §3.4). This implementation does **not** reproduce it: the lattice holds
  only the vertices of real points, so the result does not depend on the number of points modulo 4. Where the phantom
  vertices carry blur mass the difference is of the order of 1e-4.
* the order of float32 accumulation in splat and slice may differ (a few ULP).

Two back ends share one lattice construction (``_build``): vectorised torch operations (CPU and CUDA) and, on CPU when
numba is installed, JIT-compiled parallel loops. Both give the same results to rounding; the torch path can be forced
on CPU with ``backend="torch"``. Construction and the differentiable filtering are the ``crfasrnn::lattice_build``
and ``crfasrnn::lattice_filter`` operators (``_ops``), so that ``torch.compile`` and ``torch.export`` see them as
single nodes; a built lattice is a list of tensors (:attr:`PermutohedralLattice.tensors`). Features beyond what the
lattice's floating-point arithmetic handles are refused before any kernel runs (``_build.check_extent``).

The package's modules, one job each: ``_build`` (the construction, in torch), ``_numba`` (the CPU kernels), ``_torch``
(the torch filter), ``_ops`` (the operators and their fake kernels and autograd), ``_backend`` (which back end runs
where, and the numba buffer layout), ``_lattice`` (:class:`PermutohedralLattice`) and ``_passes`` (message passing
over several lattices).

A :class:`PermutohedralLattice` filters one tensor (:meth:`~PermutohedralLattice.filter`,
:meth:`~PermutohedralLattice.filter_points`) or applies the transpose (:meth:`~PermutohedralLattice.transpose_points`);
for a CRF's message passing, :func:`filter_sum` forms a weighted sum of several lattices' filterings (with the next
softmax, in one pass on numba) and :func:`filter_each` filters the same values through several lattices;
:func:`values_buffer` makes value tensors laid out as the numba filters read them without a copy.
"""

from __future__ import annotations

from .._checks import all_finite
from ._backend import Backend, empty_cache, numba_available, resolve_backend, softmax_rows, values_buffer
from ._build import max_feature_magnitude
from ._lattice import PermutohedralLattice, permutohedral_filter
from ._ops import (
    FIELDS,
    NO_NORMALIZATION,
    NORMALISER_EPS,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    mode_scales,
)
from ._ops import build as build_tensors
from ._passes import filter_each, filter_sum

__all__ = [
    "FIELDS",
    "NORMALISER_EPS",
    "NO_NORMALIZATION",
    "NORMALIZE_AFTER",
    "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC",
    "Backend",
    "PermutohedralLattice",
    "all_finite",
    "build_tensors",
    "empty_cache",
    "filter_each",
    "filter_sum",
    "max_feature_magnitude",
    "mode_scales",
    "numba_available",
    "permutohedral_filter",
    "resolve_backend",
    "softmax_rows",
    "values_buffer",
]
