"""The lattice as ``torch.library`` custom operators: ``crfasrnn::lattice_build`` and ``crfasrnn::lattice_filter``.

Registered operators are what ``torch.compile``, ``torch.export``, FakeTensor and meta tensors understand: each has a
fake kernel that gives its outputs' shapes without running it, so a compiled graph holds one node per operator and
never traces into numba or into the lattice's data-dependent construction.

A built lattice travels between operators as a fixed list of tensors (:data:`FIELDS`), which is what lets it be an
operator's output and input. Its number of vertices M depends on the data; in a fake kernel it is a fresh symbolic
size, and nothing downstream depends on it (filtered values have the shape of the values).

On the numba back end (CPU) the list carries the splat lists the compiled gather needs, with 32-bit indices; on the
torch back end (CUDA, or CPU when forced) those entries are empty and indices are 64-bit, which is how the kernels tell
the back ends apart.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from .._library import operator
from . import _torch
from ._backend import numba_kernels as _numba
from ._build import LatticeStructure, build_lattice, check_extent

__all__ = [
    "FIELDS",
    "NORMALISER_EPS",
    "build",
    "filter_flat",
    "filter_tensors",
    "is_numba",
    "mode_codes",
    "mode_scales",
    "phantom_count",
    "scale_vector",
    "structure",
]

#: The tensors of a built lattice over P points with d features, in order (M: the number of vertices).
FIELDS = (
    "offsets",  # (P, d+1) int32 (numba) / int64 (torch): each point's simplex vertices
    "weights",  # (P, d+1) barycentric weights, in the features' dtype
    "blur_neighbours",  # (d+1, 2, M+1) the two neighbours of each vertex along each axis; M is the empty vertex
    "normalizer",  # (P,) 1 / (K·1 + ε): the normalised filter's per-point factor
    "splat_start",  # numba: (M+1,) int64 start of each vertex's entries; torch and compact numba lattices: empty
    "splat_points",  # numba: (P·(d+1),) int32 points in vertex order; torch: empty
    "splat_weights",  # numba: (P·(d+1),) their weights; torch: empty
    "splat_chunks",  # numba: (K+1,) int64 vertex bounds of the splat's work items; torch: empty
)

#: Added to the filtered all-ones image before inverting it (the PyTorch port's ``np.finfo(float).eps``; Caffe uses
#: 1e-20, which makes no difference in float32 since the response is at least about 0.3).
NORMALISER_EPS = 2.220446049250313e-16


def is_numba(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a lattice's tensors were built by the numba back end."""
    return tensors[0].dtype == torch.int32


def structure(tensors: Sequence[torch.Tensor]):
    """The back end's structure over a lattice's tensors (numpy views on numba; no copy)."""
    offsets, weights, neighbours = tensors[0], tensors[1], tensors[2]
    num_vertices, dim = neighbours.shape[2] - 1, offsets.shape[1] - 1
    if is_numba(tensors):
        start, points, entry_weights, chunks = (t.numpy() for t in tensors[4:8])
        return _numba.NumbaLattice(
            offsets.numpy(),
            weights.numpy(),
            neighbours.numpy(),
            start,
            points,
            entry_weights,
            chunks,
            num_vertices,
            dim,
        )
    return LatticeStructure(offsets, weights, neighbours, num_vertices, dim)


def filter_flat(tensors, points, reverse, pre, post, out=None):
    """``post ⊙ K (pre ⊙ points)`` for (P, C) values over all the lattice's points; pre/post are (P,) or None."""
    lattice = structure(tensors)
    if is_numba(tensors):
        return _numba.filter_points(lattice, points, reverse, pre, post, out)
    result = _torch.filter_points(lattice, points, reverse, pre, post)
    return result if out is None else out.copy_(result)


#: Normalisation modes of a kernel (pydensecrf's constants, in this order): ``K v``, ``K (n ⊙ v)``, ``n ⊙ K v`` and
#: ``√n ⊙ K (√n ⊙ v)``, with ``n = 1 / (K·1 + ε)``. CRF-RNN normalises after.
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3

#: Per-point factor codes of a filtering's input (pre) or output (post): none, ``n``, ``√n``.
_NONE, _N, _SQRT_N = 0, 1, 2


def mode_scales(mode: int, transpose: bool = False) -> tuple[int, int]:
    """The (pre, post) factor codes of a normalisation mode, or of its transpose (before and after swap)."""
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"normalisation mode must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), got {mode!r}")
    codes = {
        NO_NORMALIZATION: (_NONE, _NONE),
        NORMALIZE_BEFORE: (_N, _NONE),
        NORMALIZE_AFTER: (_NONE, _N),
        NORMALIZE_SYMMETRIC: (_SQRT_N, _SQRT_N),
    }[mode]
    return codes[::-1] if transpose else codes


def mode_codes(name: str, count: int, modes, normalize: bool, transpose: bool = False) -> list[tuple[int, int]]:
    """The (pre, post) factor codes of ``count`` lattices: from ``modes`` (one each), or else ``NORMALIZE_AFTER`` for
    all where ``normalize`` and ``NO_NORMALIZATION`` where not; transposed where ``transpose``. ``name`` is the
    caller's, for the error."""
    if modes is None:
        modes = [NORMALIZE_AFTER if normalize else NO_NORMALIZATION] * count
    if len(modes) != count:
        raise ValueError(f"{name} needs one normalisation mode per lattice, got {len(modes)} for {count}")
    return [mode_scales(mode, transpose) for mode in modes]


def scale_vector(tensors, code: int):
    """The per-point factor of a code: None, ``n`` or ``√n`` (P,)."""
    if code == _NONE:
        return None
    if code == _N:
        return tensors[3]
    if code == _SQRT_N:
        return _sqrt_normalizer(tensors[3])
    raise ValueError(f"scale code must be 0 (none), 1 (n) or 2 (sqrt n), got {code!r}")


_SQRT_CACHE: dict[int, tuple] = {}


def _sqrt_normalizer(normalizer: torch.Tensor) -> torch.Tensor:
    """``√n``, kept for the last few normalisers (a mean field takes it twice per kernel and iteration)."""
    key = id(normalizer)
    hit = _SQRT_CACHE.get(key)
    if hit is not None and hit[0]() is normalizer and hit[1] == normalizer._version:
        return hit[2]
    result = normalizer.sqrt()
    if len(_SQRT_CACHE) >= 8:
        _SQRT_CACHE.pop(next(iter(_SQRT_CACHE)))
    _SQRT_CACHE[key] = (weakref.ref(normalizer), normalizer._version, result)
    return result


def filter_tensors(tensors, values, reverse, pre_scale, post_scale, out=None):
    """``s_post ⊙ K (s_pre ⊙ values)`` of (B, N, C) values (factors by code, see :func:`scale_vector`), for a lattice
    over B·N points or over N (shared)."""
    b, n, c = values.shape
    lattice_batch = tensors[0].shape[0] // n
    pre = scale_vector(tensors, pre_scale)
    post = scale_vector(tensors, post_scale)
    if lattice_batch == 1 and b > 1:  # one shared lattice: fold the batch into channels
        points = values.permute(1, 0, 2).reshape(n, b * c)
        result = filter_flat(tensors, points, reverse, pre, post).reshape(n, b, c).permute(1, 0, 2)
        return result.contiguous() if out is None else out.copy_(result)
    flat_out = None if out is None else out.view(b * n, c)
    return filter_flat(tensors, values.reshape(b * n, c), reverse, pre, post, flat_out).view(b, n, c)


# --- crfasrnn::lattice_build ----------------------------------------------------------------------------------------


@operator("lattice_build(Tensor points, str backend, int pad_to=1, bool compact=False) -> Tensor[]")
def _lattice_build(points: torch.Tensor, backend: str, pad_to: int = 1, compact: bool = False) -> list[torch.Tensor]:
    """Build the lattice of (B, N, d) contiguous points (already scaled by the bandwidths); see :data:`FIELDS`.

    ``pad_to`` > 1 adds the vertices of the zero feature vector that the SSE reference implementations (pydensecrf,
    Caffe) insert when they pad each image's points to a multiple of ``pad_to`` (see :func:`phantom_count`); the
    lattice's points are still the N given. ``compact`` (numba) leaves out the vertex-major splat lists: the splat
    then scatters by ranges of points (about half the memory per point; faster for few vertices and channels).
    """
    points = points.contiguous()
    phantoms = phantom_count(points.shape[1], pad_to)
    numba_lattice = None
    if backend == "numba":  # (its build makes check_extent's checks in its first pass over the features)
        numba_lattice = _numba.build_lattice(points, phantoms, splat_lists=not compact)
        lat = numba_lattice
        arrays = (lat.offsets, lat.weights, lat.blur_neighbours)
        splat = (lat.splat_start, lat.splat_points, lat.splat_weights, lat.splat_chunks)
        tensors = [torch.from_numpy(a) for a in arrays] + [torch.empty(0)] + [torch.from_numpy(a) for a in splat]
    else:
        check_extent(points)  # before any kernel: NaN, Inf, magnitudes the arithmetic cannot handle
        structure = build_lattice(points, phantoms)
        empty_index = points.new_empty(0, dtype=torch.int64)
        tensors = [
            structure.offsets,
            structure.weights,
            structure.blur_neighbours,
            points.new_empty(0),
            empty_index,
            points.new_empty(0, dtype=torch.int32),
            points.new_empty(0),
            empty_index.clone(),
        ]
    if numba_lattice is not None and compact:  # one compiled pass, in the same arithmetic as below
        tensors[3] = _numba.normalizer(numba_lattice, NORMALISER_EPS)
        return tensors
    ones = points.new_ones(points.shape[0] * points.shape[1], 1)
    response = filter_flat(tensors, ones, False, None, None)
    tensors[3] = (1.0 / (response + NORMALISER_EPS)).reshape(-1)
    return tensors


@torch.library.register_fake("crfasrnn::lattice_build")
def _(points: torch.Tensor, backend: str, pad_to: int = 1, compact: bool = False) -> list[torch.Tensor]:
    b, n, d = points.shape
    num = b * n
    numba = backend == "numba"
    # nominal sizes (the most vertices possible), where no symbol can be made
    rows: int | torch.SymInt = (num + b * phantom_count(n, pad_to)) * (d + 1) + 1
    chunks: int | torch.SymInt = 2
    ctx = torch.library.get_ctx() if points.device.type != "meta" else None  # meta tensors carry no data
    if ctx is not None and getattr(ctx, "_shape_env", None) is not None:  # else a FakeTensorMode without a ShapeEnv
        rows = ctx.new_dynamic_size(min=2)  # M + 1 rows: the vertices and the empty one
        chunks = ctx.new_dynamic_size(min=2) if numba and not compact else 0  # the splat's K + 1 work-item bounds
    index = torch.int32 if numba else torch.int64
    offsets = points.new_empty((num, d + 1), dtype=index)
    weights = points.new_empty((num, d + 1))
    neighbours = points.new_empty((d + 1, 2, rows), dtype=index)
    normalizer = points.new_empty((num,))
    if numba and not compact:
        splat = [
            points.new_empty((rows,), dtype=torch.int64),
            points.new_empty((num * (d + 1),), dtype=torch.int32),
            points.new_empty((num * (d + 1),)),
            points.new_empty((chunks,), dtype=torch.int64),
        ]
    else:
        splat = [
            points.new_empty((0,), dtype=torch.int64),
            points.new_empty((0,), dtype=torch.int32),
            points.new_empty((0,)),
            points.new_empty((0,), dtype=torch.int64),
        ]
    return [offsets, weights, neighbours, normalizer, *splat]


def build(points: torch.Tensor, backend: str, pad_to: int = 1, compact: bool = False) -> list[torch.Tensor]:
    """Build a lattice with the registered operator (``backend`` is ``"numba"`` or ``"torch"``)."""
    return torch.ops.crfasrnn.lattice_build(points, backend, pad_to, compact)


def phantom_count(num_points: int, pad_to: int) -> int:
    """How many zero feature vectors an SSE reference implementation appends to an image of ``num_points`` points.

    pydensecrf's and Caffe's lattices elevate the points four at a time and pad the last group with zero features,
    whose simplex vertices they insert into the lattice like any other (docs/reference.md §3.4, the "phantom vertices"):
    the blur then also passes through the vertices around the zero vector. ``pad_to`` is that group size (4), or 1 for
    none.
    """
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be an integer >= 1, got {pad_to!r}")
    return (-num_points) % pad_to


# --- crfasrnn::lattice_filter ---------------------------------------------------------------------------------------


@operator("lattice_filter(Tensor values, Tensor[] lattice, bool reverse, int pre_scale, int post_scale) -> Tensor")
def _lattice_filter(
    values: torch.Tensor, lattice: list[torch.Tensor], reverse: bool, pre_scale: int, post_scale: int
) -> torch.Tensor:
    """``s_post ⊙ K (s_pre ⊙ values)`` for (B, N, C) values, the factors by code (0: none, 1: ``n``, 2: ``√n``;
    ``K`` blurs in reverse axis order where ``reverse``)."""
    return filter_tensors(lattice, values, reverse, pre_scale, post_scale)


@torch.library.register_fake("crfasrnn::lattice_filter")
def _(values, lattice, reverse, pre_scale, post_scale):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _filter_setup(ctx, inputs, output):
    _, lattice, reverse, pre_scale, post_scale = inputs
    ctx.save_for_backward(*lattice)
    ctx.flags = (reverse, pre_scale, post_scale)


def _filter_backward(ctx, grad):
    reverse, pre_scale, post_scale = ctx.flags
    # the transpose of post ⊙ K (pre ⊙ v) is pre ⊙ Kᵀ (post ⊙ g), and Kᵀ is K with the axes blurred in reverse order
    grad_values = torch.ops.crfasrnn.lattice_filter(
        grad.contiguous(), list(ctx.saved_tensors), not reverse, post_scale, pre_scale
    )
    return grad_values, [None] * len(ctx.saved_tensors), None, None, None


torch.library.register_autograd("crfasrnn::lattice_filter", _filter_backward, setup_context=_filter_setup)
