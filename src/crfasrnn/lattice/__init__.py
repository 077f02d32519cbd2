"""The permutohedral lattice: fast approximate high-dimensional Gaussian filtering (Adams et al., 2010).

This is the lattice of the CRF-RNN reference implementations (Krähenbühl's dense-CRF ``permutohedral.cpp`` as modified
for CRF-RNN, see SPEC §3): features are elevated onto the hyperplane of a (d+1)-dimensional lattice, every point is
splatted with barycentric weights onto the d+1 vertices of its enclosing simplex, the lattice is blurred with the
unnormalised kernel [1/2, 1, 1/2] along each of its d+1 axes in turn, and the values are sliced back with the same
weights, scaled by 1 / (1 + 2^-d). The result approximates ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up to a constant.

Differences from the reference, both of which leave the results within float32 rounding of it:

* the reference pads the points to a multiple of 4 with zero feature vectors whose simplex vertices enter its hash table
  (the "phantom-vertex quirk", SPEC §3.4). This implementation does **not** reproduce it: the lattice holds only the
  vertices of real points, so the result does not depend on the number of points modulo 4. Where the phantom vertices
  carry blur mass the difference is of the order of 1e-4.
* the order of float32 accumulation in splat and slice may differ (a few ULP).

Two back ends share one lattice construction (``_build``): vectorised torch operations (CPU and CUDA) and, on CPU when
numba is installed, JIT-compiled parallel loops. Both give the same results to rounding; the torch path can be forced
on CPU with ``backend="torch"``. Construction and the differentiable filtering are the ``crfasrnn::lattice_build``
and ``crfasrnn::lattice_filter`` operators (``_ops``), so that ``torch.compile`` and ``torch.export`` see them as
single nodes; a built lattice is a list of tensors (:attr:`PermutohedralLattice.tensors`). Features beyond what the
lattice's floating-point arithmetic handles are refused before any kernel runs (``_build.check_extent``).

A :class:`PermutohedralLattice` filters one tensor (:meth:`~PermutohedralLattice.filter`,
:meth:`~PermutohedralLattice.filter_points`) or applies the transpose (:meth:`~PermutohedralLattice.transpose_points`);
for a CRF's message passing, :func:`filter_sum` forms a weighted sum of several lattices' filterings (with the next
softmax, in one pass on numba) and :func:`filter_each` filters the same values through several lattices;
:func:`values_buffer` makes value tensors laid out as the numba filters read them without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from . import _ops
from ._ops import NORMALISER_EPS

try:  # numba is optional: the torch path is used without it
    from . import _numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None

__all__ = [
    "NORMALISER_EPS",
    "PermutohedralLattice",
    "all_finite",
    "empty_cache",
    "filter_each",
    "filter_sum",
    "numba_available",
    "permutohedral_filter",
    "resolve_backend",
    "values_buffer",
]

Backend = Literal["auto", "torch", "numba"]

_HALF = (torch.float16, torch.bfloat16)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (one reduction pass, no tensor-sized temporary)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_buffer(name: str, buffer: torch.Tensor, like: torch.Tensor, *, padded_rows: bool = False) -> None:
    """An output buffer must be a contiguous tensor of ``like``'s shape, dtype and device.

    With ``padded_rows``, a (B, N, C) buffer may also be a column slice of a wider contiguous tensor (its rows
    contiguous and equally spaced), as :func:`values_buffer` makes.
    """
    layout_ok = buffer.is_contiguous() or (padded_rows and _has_padded_rows(buffer))
    if buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device or not layout_ok:
        kind = "have contiguous (or padded) rows" if padded_rows else "be contiguous"
        raise ValueError(
            f"{name} must match values {tuple(like.shape)} {like.dtype} on {like.device} and {kind}, got "
            f"{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}" + ("" if layout_ok else " (not contiguous)")
        )


def _has_padded_rows(tensor: torch.Tensor) -> bool:
    """Whether a (..., C) tensor is a stack of contiguous, equally spaced, non-overlapping rows."""
    if tensor.numel() == 0 or tensor.stride(-1) != 1:
        return False
    try:
        rows = tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return False
    return rows.shape[0] == 1 or rows.stride(0) >= rows.shape[1]


def values_buffer(batch: int, num_points: int, channels: int, *, like: torch.Tensor) -> torch.Tensor:
    """A zero (B, N, C) tensor laid out as the filters read fastest, for values filtered again and again.

    On the numba back end the channel loops work in blocks of 8, so values whose rows are padded to a multiple of 8
    channels are read without a copy: the tensor returned is then a column slice of a wider zero tensor (its padding
    must stay finite; :func:`filter_sum` writes only the first C channels). Elsewhere it is a plain contiguous tensor.

    Args:
        batch, num_points, channels: the shape (B, H·W, C) in point layout.
        like: a tensor whose dtype and device the buffer takes.

    Example:
        >>> p = values_buffer(1, 6, 21, like=torch.empty(0))
        >>> p.shape, p.stride()
        (torch.Size([1, 6, 21]), (144, 24, 1))
    """
    width = channels
    if _numba is not None and like.device.type == "cpu":
        width = _numba.padded_width(channels)
    return torch.zeros(batch, num_points, width, dtype=like.dtype, device=like.device)[..., :channels]


def empty_cache() -> int:
    """Release the idle scratch buffers the numba back end keeps between filterings (at most 128 MB).

    Returns:
        The number of bytes released (0 without numba).

    Example:
        >>> empty_cache() >= 0
        True
    """
    return _numba._SCRATCH.clear() if _numba is not None else 0


def numba_available() -> bool:
    """Whether the numba CPU back end can be used."""
    return _numba is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The back end ``"auto"``, ``"torch"`` or ``"numba"`` stands for on ``device``: numba on CPU where installed.

    Raises:
        ValueError: an unknown name, or numba asked for where it cannot run.
    """
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend == "numba" and (_numba is None or device.type != "cpu"):
        raise ValueError("the numba back end needs numba installed and tensors on the CPU")
    if backend == "auto":
        return "numba" if _numba is not None and device.type == "cpu" else "torch"
    return backend


class PermutohedralLattice:
    """A permutohedral lattice built once from per-pixel features and reused for any number of filterings.

    Each image of the batch gets its own lattice (the images never share a vertex). A lattice built from a batch of
    one image can filter a batch of any size with that same lattice (useful for the spatial kernel, which depends only
    on the image size).

    Args:
        features: (B, d, *spatial) floating tensor of per-point feature vectors (a signal, an image (B, d, H, W) or a
            volume (B, d, D, H, W)), already divided by the bandwidths (the
            lattice approximates a Gaussian of standard deviation 1 in feature space). Not differentiated.
            float16 and bfloat16 features are converted to float32 (the lattice's arithmetic needs its precision);
            half values given to :meth:`filter` and :meth:`filter_points` are then filtered in float32 and returned
            in their dtype.
        backend: ``"auto"`` (numba on CPU where installed, torch otherwise), ``"torch"`` or ``"numba"`` (CPU only).
        pad_to: build the lattice as the SSE reference implementations (pydensecrf, Caffe) do, whose elevation pads
            each image's points with zero feature vectors to a multiple of 4 and adds those vectors' vertices to the
            lattice (SPEC §3.4): ``pad_to=4`` reproduces their numbers where N is not a multiple of 4 (the
            difference is of the order of 1e-4, near the zero vector). 1 (the default): no phantom vertices.
        compact: on the numba back end, keep no vertex-major splat lists (two arrays of one entry per point and
            vertex): the splat then scatters ranges of points into grids of their own, summed in order. About half
            the memory, and faster where the lattice has few vertices and the values few channels (volumes); the
            sums' order differs, so results differ from the default's in the last bits. The torch back end has no
            lists either way.

    Shape:
        - features: (B, d, *spatial), 1 to 3 spatial dimensions (e.g. (B, d, H, W))
        - values given to :meth:`filter`: (B, C, *spatial) or, with a lattice of batch 1, (B', C, *spatial)
        - values given to :meth:`filter_points`: (B, N, C) (channels last; N the number of points, e.g. H·W)
        - output: same as the values

    Example:
        >>> feats = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij"))[None] / 2
        >>> lattice = PermutohedralLattice(feats)
        >>> lattice.filter(torch.ones(1, 3, 4, 5)).shape
        torch.Size([1, 3, 4, 5])
    """

    def __init__(self, features: torch.Tensor, *, backend: Backend = "auto", pad_to: int = 1,
                 compact: bool = False) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not 3 <= features.ndim <= 5:
            raise ValueError(f"features must have shape (B, d, *spatial) with 1 to 3 spatial dimensions, e.g. "
                             f"(B, d, H, W), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating tensor, got dtype {features.dtype}")
        if min(features.shape) < 1:
            raise ValueError(f"features must have B, d and every size >= 1, got shape {tuple(features.shape)}")
        backend = resolve_backend(backend, features.device)
        if features.dtype in _HALF:
            features = features.float()
        batch, d = features.shape[:2]
        size = tuple(int(s) for s in features.shape[2:])
        num_points = math.prod(size)
        points = features.detach().reshape(batch, d, num_points).transpose(1, 2).contiguous()
        self._init(_ops.build(points, backend, pad_to, compact), num_points)
        self.size = size

    def _init(self, tensors: list[torch.Tensor], num_points: int) -> None:
        self._tensors = tensors
        self.backend: str = "numba" if _ops.is_numba(tensors) else "torch"
        self.num_points = num_points
        self.batch_size = tensors[0].shape[0] // num_points
        self.dim = tensors[0].shape[1] - 1
        self.size: tuple[int, ...] = (num_points,)
        self.dtype = tensors[1].dtype
        self.device = tensors[1].device
        self._built_structure = None

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], num_points: int) -> PermutohedralLattice:
        """A lattice over the tensors of a built one (:attr:`tensors`), e.g. inside an operator; ``size`` is (N,)."""
        lattice = cls.__new__(cls)
        lattice._init(list(tensors), num_points)
        return lattice

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The built lattice as a list of tensors (see :data:`crfasrnn.lattice._ops.FIELDS`), as operators take it."""
        return self._tensors

    @property
    def _structure(self):
        if self._built_structure is None:
            self._built_structure = _ops.structure(self._tensors)
        return self._built_structure

    @property
    def num_vertices(self) -> int:
        """Number of lattice vertices (over the whole batch)."""
        return self._tensors[2].shape[2] - 1

    @property
    def normalizer(self) -> torch.Tensor:
        """(B, H·W, 1) per-pixel normaliser ``1 / (K·1 + ε)``, computed with the lattice (ε = 2.22e-16)."""
        return self._tensors[3].view(self.batch_size, -1, 1)

    def filter(self, values: torch.Tensor, reverse: bool = False, normalize: bool = False) -> torch.Tensor:
        """Filter values through the lattice, differentiably with respect to ``values``.

        Args:
            values: (B, C, *spatial) tensor with the lattice's dtype, device and size; B must equal the lattice's batch
                size, or the lattice must have batch size 1 (then it filters every image of ``values``).
            reverse: blur the lattice axes in reverse order, which applies the transpose of the forward filter.
            normalize: divide the result per pixel by the filtered all-ones image (see :attr:`normalizer`), so that
                the weights at each pixel sum to about one: ``n ⊙ K v``.

        Returns:
            (B, C, *spatial) filtered values.
        """
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.ndim != 2 + len(self.size) or tuple(values.shape[2:]) != self.size:
            raise ValueError(
                f"values must have shape (B, C, {', '.join(map(str, self.size))}) for this lattice, "
                f"got {tuple(values.shape)}"
            )
        b, c = values.shape[:2]
        points = values.reshape(b, c, self.num_points).transpose(1, 2)
        return self.filter_points(points, reverse, normalize).transpose(1, 2).reshape(values.shape)

    def filter_points(
        self,
        values: torch.Tensor,
        reverse: bool = False,
        normalize: bool = False,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like :meth:`filter`, for values in point layout (channels last), which avoids two transpositions.

        Args:
            values: (B, H·W, C) values; pixel ``y·W + x`` of image b is row ``values[b, y·W + x]``.
            reverse: blur the lattice axes in reverse order (the transpose).
            normalize: multiply the result by :attr:`normalizer`.
            out: optional contiguous tensor shaped like ``values`` to write the result into (not differentiable:
                only where no gradient is needed, to reuse memory across calls).

        Returns:
            (B, H·W, C) filtered values (``out`` when given).
        """
        return self._filter_checked("filter_points", values, reverse, False, normalize, out)

    def transpose_points(
        self,
        values: torch.Tensor,
        normalize: bool = False,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transpose of :meth:`filter_points`: ``Kᵀ values``, or ``Kᵀ (n ⊙ values)`` where ``normalize``.

        What the backward of a filtering needs: for ``y = n ⊙ K v``, ``∂L/∂v = Kᵀ (n ⊙ ∂L/∂y)``. The normaliser
        scales the values as they are splatted, which spares a product over the whole tensor.

        Args:
            values: (B, H·W, C) values in point layout (rows may be padded, see :func:`values_buffer`).
            normalize: scale the values by :attr:`normalizer` before the transposed filter.
            out: optional contiguous tensor shaped like ``values`` to write into (not differentiable).

        Returns:
            (B, H·W, C) result (``out`` when given), differentiable with respect to ``values`` when ``out`` is None.

        Example:
            >>> feats = torch.rand(1, 3, 4, 5) * 4
            >>> lattice = PermutohedralLattice(feats)
            >>> v, g = torch.rand(1, 20, 2), torch.rand(1, 20, 2)
            >>> lhs = (lattice.filter_points(v, normalize=True) * g).sum()
            >>> rhs = (v * lattice.transpose_points(g, normalize=True)).sum()
            >>> bool(torch.isclose(lhs, rhs, rtol=1e-5))
            True
        """
        return self._filter_checked("transpose_points", values, True, normalize, False, out)

    def _filter_checked(
        self,
        name: str,
        values: torch.Tensor,
        reverse: bool,
        pre: bool,
        post: bool,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """``n^post ⊙ K (n^pre ⊙ values)`` for the public method ``name``: differentiable (the ``crfasrnn::lattice_filter``
        operator), or into ``out`` without autograd."""
        if out is None and values.dtype in _HALF and self.dtype == torch.float32:  # computed in float32
            return self._filter_checked(name, values.float(), reverse, pre, post, None).to(values.dtype)
        self._check_points(values)
        if out is None:
            return torch.ops.crfasrnn.lattice_filter(values, self._tensors, reverse, int(pre), int(post))
        _check_buffer("out", out, values)
        if torch.is_grad_enabled() and (values.requires_grad or out.requires_grad):
            raise RuntimeError(f"{name}(out=...) does not support autograd; call it without out= to differentiate")
        with torch.no_grad():
            _ops.filter_tensors(self._tensors, values, reverse, int(pre), int(post), out=out)
        return out

    def _check_points(self, values: torch.Tensor) -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype != self.dtype:
            raise TypeError(f"values have dtype {values.dtype} but the lattice features have dtype {self.dtype}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device} but the lattice is on {self.device}")
        num_points = self.num_points
        if (
            values.ndim != 3
            or values.shape[1] != num_points
            or values.shape[2] < 1
            or (values.shape[0] != self.batch_size and self.batch_size != 1)
            or values.shape[0] < 1
        ):
            raise ValueError(
                f"values of shape {tuple(values.shape)} do not fit a lattice built for batch {self.batch_size} and "
                f"size {self.size} (expected ({self.batch_size}, {num_points}, C))"
            )


def filter_each(
    values: torch.Tensor,
    lattices: Sequence[PermutohedralLattice],
    *,
    normalize: bool = False,
    transpose: bool = False,
    out: Sequence[torch.Tensor | None] | None = None,
    modes: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """The same values filtered through each of several lattices (or through their transposes).

    Equivalent to ``[lattice.filter_points(values, normalize=normalize) for lattice in lattices]`` (with
    ``transpose``: :meth:`PermutohedralLattice.transpose_points`), but not differentiable, and on the numba back end
    the values are laid out for the filters once rather than once per lattice. What a CRF's message passing (and its
    backward) does with the same probabilities (gradients) and its two kernels.

    Args:
        values: (B, H·W, C) values in point layout (rows may be padded, see :func:`values_buffer`).
        lattices: lattices built over the same image size (each for batch B, or 1 to be shared by the batch).
        normalize: multiply by each lattice's normaliser (after the filter; before the transposed filter).
        transpose: apply the transposed filters.
        out: optional (B, H·W, C) tensors to write into, one per lattice (or None); their rows may be padded, so that
            they can be column slices of one tensor, e.g. the halves of a (B, H·W, 2C) tensor.
        modes: per lattice, a normalisation mode (``_ops.NO_NORMALIZATION`` … ``NORMALIZE_SYMMETRIC``) instead of
            ``normalize`` (which means ``NORMALIZE_AFTER`` for every lattice); with ``transpose``, its transpose.

    Returns:
        One (B, H·W, C) tensor per lattice (the ``out`` tensors when given).

    Example:
        >>> yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        >>> a = PermutohedralLattice(torch.stack([xx, yy])[None] / 3.0)
        >>> b = PermutohedralLattice(torch.stack([xx, yy, xx * yy])[None] / 5.0)
        >>> v = torch.rand(1, 48, 2)
        >>> fa, fb = filter_each(v, [a, b], normalize=True)
        >>> torch.allclose(fb, b.filter_points(v, normalize=True))
        True
    """
    outs = list(out) if out is not None else [None] * len(lattices)
    if len(outs) != len(lattices) or not lattices:
        raise ValueError(f"filter_each needs at least one lattice and one out per lattice, got {len(lattices)} "
                         f"lattices and {len(outs)} out tensors")
    for lattice, buffer in zip(lattices, outs):
        lattice._check_points(values)
        if buffer is not None:
            _check_buffer("out", buffer, values, padded_rows=True)
    b, n, c = values.shape
    codes = _ops.mode_codes("filter_each", len(lattices), modes, normalize, transpose)
    with torch.no_grad():
        if all(lattice.backend == "numba" and lattice.batch_size == b for lattice in lattices):
            pres = [_ops.scale_vector(lat.tensors, pre) for lat, (pre, _) in zip(lattices, codes)]
            posts = [_ops.scale_vector(lat.tensors, post) for lat, (_, post) in zip(lattices, codes)]
            flat_outs = [None if o is None else o.view(b * n, c) for o in outs]
            results = _numba.filter_each(
                tuple(lattice._structure for lattice in lattices),
                values.reshape(b * n, c),
                transpose,
                tuple(pres),
                tuple(posts),
                tuple(flat_outs),
            )
            return [r.view(b, n, c) if o is None else o for r, o in zip(results, outs)]
        results = [_ops.filter_tensors(lat.tensors, values, transpose, pre, post) for lat, (pre, post) in
                   zip(lattices, codes)]
        return [r if o is None else o.copy_(r) for r, o in zip(results, outs)]


def filter_sum(
    values: torch.Tensor,
    lattices: Sequence[PermutohedralLattice],
    scales: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    normalize: bool = True,
    out: torch.Tensor | None = None,
    softmax_out: torch.Tensor | None = None,
    keep_sum: bool = True,
    modes: Sequence[int] | None = None,
) -> torch.Tensor:
    """A weighted sum of several lattices' filterings of the same values: ``base + Σ_k (K_k values) ∘ scales[k]``.

    What a dense CRF's message passing computes with its kernels (``K_k`` normalised by :attr:`~PermutohedralLattice.
    normalizer` when ``normalize``). Not differentiable: for inference, where it saves memory and time — on the numba
    back end, with per-channel factors, two lattices are sliced in one pass, without materialising either filtered
    tensor (channel-mixing matrices are applied with a matrix product after the filters).

    Args:
        values: (B, H·W, C) values in point layout (see :meth:`PermutohedralLattice.filter_points`).
        lattices: lattices built over the same image size (each for batch B, or 1 to be shared by the batch).
        scales: per lattice, (C,) per-channel factors (``∘`` multiplies channel by channel) or a (C, C) channel-mixing
            matrix (``∘`` is the product of each point's row of C values with it, as in ``x @ M``).
        base: optional (B, H·W, C) term added to the sum (zeros if None).
        normalize: multiply each filtering by its lattice's normaliser.
        out: optional contiguous (B, H·W, C) tensor to write into; it may be ``base`` itself.
        softmax_out: optional (B, H·W, C) tensor that receives the softmax of the result over its channels (a
            mean-field step's next probabilities); it may be ``values`` itself, and contiguous or made by
            :func:`values_buffer` (values are fastest made so, when they are filtered again and again). On the numba
            back end in float32 it is computed in the same pass, which spares a pass over memory and a hand-over to torch's thread pool.
        keep_sum: with ``softmax_out``, ``False`` means that only the softmax is wanted: the sum is not stored (``out``
            is ignored) and ``softmax_out`` is returned.
        modes: per lattice, a normalisation mode (see :func:`filter_each`) instead of ``normalize``.

    Returns:
        (B, H·W, C) sum (``out`` when given), or ``softmax_out`` where ``keep_sum`` is False.

    Example:
        >>> yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        >>> a = PermutohedralLattice(torch.stack([xx, yy])[None] / 3.0)
        >>> b = PermutohedralLattice(torch.stack([xx, yy, xx * yy])[None] / 5.0)
        >>> v = torch.rand(1, 48, 2)
        >>> total = filter_sum(v, [a, b], [torch.ones(2), -torch.ones(2)])
        >>> torch.allclose(total, a.filter_points(v, normalize=True) - b.filter_points(v, normalize=True), atol=1e-6)
        True
    """
    if len(lattices) != len(scales) or not lattices:
        raise ValueError(f"filter_sum needs one scale per lattice and at least one lattice, got {len(lattices)} "
                         f"lattices and {len(scales)} scales")
    for lattice in lattices:
        lattice._check_points(values)
    b, n, c = values.shape
    for scale in scales:
        if scale.shape not in ((c,), (c, c)):
            raise ValueError(f"each scale must have shape ({c},) or ({c}, {c}) for values {tuple(values.shape)}, got "
                             f"{tuple(scale.shape)}")
    if base is not None and base.shape != values.shape:
        raise ValueError(f"base {tuple(base.shape)} must have the shape of values {tuple(values.shape)}")
    if out is None:
        out = torch.empty_like(values)
    else:
        _check_buffer("out", out, values)
    if softmax_out is not None:
        _check_buffer("softmax_out", softmax_out, values, padded_rows=True)
    if not keep_sum and softmax_out is None:
        raise ValueError("keep_sum=False needs softmax_out: otherwise nothing would be computed")
    codes = _ops.mode_codes("filter_sum", len(lattices), modes, normalize)
    with torch.no_grad():
        if base is None:
            base = torch.zeros_like(values)
        fused = (
            len(lattices) == 2
            and all(lattice.backend == "numba" for lattice in lattices)
            and all(scale.ndim == 1 for scale in scales)
            and base.is_contiguous()
        )
        if fused:
            posts = [_ops.scale_vector(lat.tensors, post) for lat, (_, post) in zip(lattices, codes)]
            posts = [values.new_ones(lat.batch_size * n) if p is None else p for lat, p in zip(lattices, posts)]
            pres = [_ops.scale_vector(lat.tensors, pre) for lat, (pre, _) in zip(lattices, codes)]
            fused_softmax = softmax_out is not None and values.dtype == torch.float32
            store_sum = keep_sum or not fused_softmax  # only the softmax wanted and fused: the sum is never stored
            _numba.filter_sum(
                tuple(lattices[k]._structure for k in range(2)),
                values,
                tuple(s.to(values.dtype).contiguous() for s in scales),
                tuple(posts),
                base.reshape(b * n, c),
                out.view(b * n, c) if store_sum else None,
                softmax_out if fused_softmax else None,
                pre_scales=tuple(pres),
            )
        else:
            fused_softmax = False
            terms = filter_each(values, lattices, normalize=normalize, modes=modes)  # on numba, laid out once
            flat = out.view(b * n, c)
            for k, (term, scale) in enumerate(zip(terms, scales)):
                start = base if k == 0 else out  # the first term also brings in the base (no separate copy)
                if scale.ndim == 2:
                    torch.addmm(start.reshape(b * n, c), term.reshape(b * n, c), scale.to(values.dtype), out=flat)
                else:
                    torch.addcmul(start, term, scale.to(values.dtype), out=out)
        if softmax_out is not None and not fused_softmax:
            torch.softmax(out, dim=-1, out=softmax_out)
        return out if keep_sum else softmax_out


def permutohedral_filter(
    values: torch.Tensor, features: torch.Tensor, *, reverse: bool = False, backend: Backend = "auto"
) -> torch.Tensor:
    """Filter ``values`` with the unnormalised permutohedral-lattice Gaussian over ``features``.

    Builds a :class:`PermutohedralLattice` and filters once. To filter several times with the same features, build the
    lattice once and call :meth:`PermutohedralLattice.filter`.

    Args:
        values: (B, C, H, W) values to filter.
        features: (B, d, H, W) per-pixel features, already divided by the bandwidths; same dtype and device.
        reverse: blur in reverse axis order, which is exactly the transpose of the forward filter.
        backend: see :class:`PermutohedralLattice`.

    Returns:
        (B, C, H, W) filtered values, differentiable with respect to ``values``.

    Shape:
        - values: (B, C, H, W)
        - features: (B, d, H, W)
        - output: (B, C, H, W)

    Example:
        >>> yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        >>> feats = torch.stack([xx, yy])[None] / 3.0
        >>> out = permutohedral_filter(torch.ones(1, 1, 6, 8), feats)
        >>> out.shape
        torch.Size([1, 1, 6, 8])
    """
    if not isinstance(values, torch.Tensor) or not isinstance(features, torch.Tensor):
        raise TypeError("values and features must be torch tensors")
    if values.ndim != 4 or features.ndim != 4:
        raise ValueError(
            f"values must be (B, C, H, W) and features (B, d, H, W), got {tuple(values.shape)} and "
            f"{tuple(features.shape)}"
        )
    if values.shape[0] != features.shape[0] or values.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"values {tuple(values.shape)} and features {tuple(features.shape)} differ in batch size or H, W"
        )
    if values.dtype != features.dtype:
        raise TypeError(f"values have dtype {values.dtype} but features have dtype {features.dtype}")
    return PermutohedralLattice(features, backend=backend).filter(values, reverse=reverse)
