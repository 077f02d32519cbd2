"""The dense-CRF engine: mean-field inference of a fully connected CRF with any Gaussian kernels, in 1, 2 or 3
dimensions.

A dense CRF (Krähenbühl and Koltun, NIPS 2011) over the points of a signal, an image or a volume has a unary term per
point and label and, for each of its kernels k, a pairwise term ``μ_k(l, l') · w_k · exp(−|f_i − f_j|² / 2)`` between
every two points i, j, where ``f`` are the kernel's features already divided by its bandwidths. Mean-field inference
iterates

    ``Q = softmax(q)``,  ``q = u − Σ_k (norm_k(K_k Q)) (M_k W_k)ᵀ``  (one row of C values per point)

from ``q = u``, where ``u`` are the unary *scores* (``−energy``), ``K_k`` is the kernel's Gaussian filter (the
permutohedral lattice, :mod:`crfasrnn.lattice`), ``W_k`` its weights and ``M_k`` its label compatibility (the Potts
model is ``M = −I``: it rewards neighbours that agree). ``norm_k`` is one of the normalisations of pydensecrf:

* ``"none"``: ``K Q``;
* ``"before"``: ``K (n ⊙ Q)``;
* ``"after"``: ``n ⊙ K Q`` (CRF-RNN's);
* ``"symmetric"``: ``√n ⊙ K (√n ⊙ Q)`` (pydensecrf's default),

with ``n = 1 / (K·1)``, the inverse of the kernel's response to an all-ones image.

Three faces, one implementation (the ``crfasrnn::mean_field`` operator underneath all of them):

* :func:`dense_crf`: the functional form over features you build (or lattices you built once);
* :class:`DenseCRF`: a module of :class:`GaussianKernel` descriptions (positions with a bandwidth per axis, guide
  channels with a bandwidth each) whose weights and compatibility are learnable;
* :class:`crfasrnn.CrfRnn`, the CRF-RNN layer, is :func:`dense_crf` with a spatial and a bilateral kernel normalised
  after, and one shared compatibility matrix.

Features of positions are ordered with the *last* array axis first — ``(x, y)`` for an (H, W) image, ``(x, y, z)`` for
a (D, H, W) volume — as densecrf and CRF-RNN order them; bandwidths and voxel spacings are given in array-axis order.
The lattice's approximation depends slightly on the order of the features, so the order matters to match them.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from . import _mean_field  # (also registers crfasrnn::mean_field)
from ._checks import check_count, check_iterations, describe, require
from ._precision import compute_dtype, precision
from .errors import InputTypeError
from .lattice import (
    FIELDS,
    NO_NORMALIZATION,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    PermutohedralLattice,
    build_tensors,
    max_feature_magnitude,
    resolve_backend,
)

__all__ = [
    "NORMALIZATIONS",
    "DenseCRF",
    "GaussianKernel",
    "dense_crf",
    "guided_features",
    "per_axis",
    "position_features",
    "position_lattice",
    # building blocks of the layers built on the engine (crfasrnn.crf, crfasrnn.densecrf)
    "check_position_extent",
    "kernel_lattice",
    "marginals_points",
    "mean_field_points",
    "mean_field_scores",
    "position_lattice_tensors",
]

Normalization = Literal["none", "before", "after", "symmetric"]

#: The normalisation names and the operators' mode codes (pydensecrf's constants, in its order).
NORMALIZATIONS: dict[str, int] = {
    "none": NO_NORMALIZATION,
    "before": NORMALIZE_BEFORE,
    "after": NORMALIZE_AFTER,
    "symmetric": NORMALIZE_SYMMETRIC,
}

#: A kernel weight or compatibility: a number, a per-class vector (C,) or a (C, C) matrix.
Coefficient = float | Sequence[float] | torch.Tensor
#: A kernel's input to :func:`dense_crf`: (B or 1, d, *spatial) features, or a lattice built from such features.
KernelInput = torch.Tensor | PermutohedralLattice | Sequence[torch.Tensor]


# --- features --------------------------------------------------------------------------------------------------------


def per_axis(name: str, value, count: int, *, allow_inf: bool = False, hint: str = "") -> tuple[float, ...]:
    """A positive number or ``count`` positive numbers (a bandwidth or a spacing per axis, a bandwidth per channel), as
    a tuple of ``count`` floats; ``hint`` is appended to the error.

    Example:
        >>> per_axis("spacing", 2, 3)
        (2.0, 2.0, 2.0)
    """
    if isinstance(value, numbers.Real):
        values = [value] * count
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be one finite number > 0 or {count} of them, got {value!r}{hint}")
    else:
        values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} needs 1 or {count} values, got {len(values)} ({value!r}){hint}")
    out = []
    for v in values:
        if (
            isinstance(v, bool)
            or not isinstance(v, numbers.Real)
            or math.isnan(v)
            or v <= 0
            or (math.isinf(v) and not allow_inf)
        ):
            raise ValueError(
                f"{name} must be {'positive numbers (inf: unused)' if allow_inf else 'finite numbers > 0'}"
                f", got {value!r}{hint}"
            )
        out.append(float(v))
    return tuple(out)


def position_features(
    spatial_shape: Sequence[int],
    bandwidth: float | Sequence[float],
    *,
    spacing: float | Sequence[float] | None = None,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """The positions of every point divided by the bandwidth: a Gaussian kernel over distance.

    Position ``i`` along an axis is ``i · spacing / bandwidth`` (``i / bandwidth`` without a spacing, computed as a
    division as densecrf does). The features are ordered last axis first (x, y, z).

    Args:
        spatial_shape: the 1, 2 or 3 sizes of the signal, image or volume.
        bandwidth: the kernel's standard deviation in the units of ``spacing`` (points without one); one number, or
            one per axis in array-axis order.
        spacing: the distance between neighbouring points along each axis (e.g. a voxel size in millimetres).
        like: a tensor whose dtype and device the features take (float32 on the CPU by default).

    Returns:
        (1, n, *spatial_shape) features, n = ``len(spatial_shape)``.

    Example:
        >>> position_features((2, 3), (1.0, 2.0))[0, :, 1, 2]  # (x / 2, y / 1) at row 1, column 2
        tensor([1., 1.])
    """
    shape = tuple(int(s) for s in spatial_shape)
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(f"spatial_shape must have 1, 2 or 3 sizes >= 1, got {tuple(spatial_shape)}")
    bandwidths = per_axis("bandwidth", bandwidth, len(shape))
    spacings = None if spacing is None else per_axis("spacing", spacing, len(shape))
    dtype = torch.float32 if like is None else like.dtype
    device = None if like is None else like.device
    axes = []
    for axis in reversed(range(len(shape))):  # last axis first: x, y, z
        coords = torch.arange(shape[axis], dtype=dtype, device=device)
        if spacings is not None:
            coords = coords * spacings[axis]
        coords = coords / bandwidths[axis]
        view = [1] * len(shape)
        view[axis] = shape[axis]
        axes.append(coords.view(view).expand(shape))
    return torch.stack(axes)[None]


def guided_features(
    guide: torch.Tensor,
    position_bandwidth: float | Sequence[float] | None,
    guide_bandwidth: float | Sequence[float],
    *,
    spacing: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Features of a bilateral (appearance) kernel: positions over ``position_bandwidth``, then the guide's channels,
    each over its bandwidth (an infinite bandwidth leaves a channel out).

    Args:
        guide: (B, G, *spatial) guide channels (colours, MRI modalities, depth, flow, embeddings).
        position_bandwidth: as in :func:`position_features`; None for a kernel over the guide alone.
        guide_bandwidth: one number for every channel, or one per channel.
        spacing: as in :func:`position_features`.

    Returns:
        (B, n + G', *spatial) features (G' the channels with a finite bandwidth).

    Example:
        >>> image = torch.full((1, 3, 4, 5), 26.0)
        >>> guided_features(image, 80.0, 13.0).shape
        torch.Size([1, 5, 4, 5])
    """
    if not isinstance(guide, torch.Tensor) or guide.ndim < 3 or guide.ndim > 5 or not guide.is_floating_point():
        raise ValueError(
            f"guide must be a floating (B, G, *spatial) tensor with 1 to 3 spatial dimensions, got {describe(guide)}"
        )
    b, g = guide.shape[:2]
    bandwidths = per_axis("guide_bandwidth", guide_bandwidth, g, allow_inf=True)
    channels = [guide[:, i : i + 1] / bw for i, bw in enumerate(bandwidths) if math.isfinite(bw)]
    parts = []
    if position_bandwidth is not None:
        positions = position_features(guide.shape[2:], position_bandwidth, spacing=spacing, like=guide)
        parts.append(positions.expand(b, *positions.shape[1:]))
    parts.extend(channels)
    if not parts:
        raise ValueError("a guided kernel needs positions or at least one guide channel with a finite bandwidth")
    return torch.cat(parts, dim=1)


# --- the functional form --------------------------------------------------------------------------------------------


def _mode(name: str, normalization) -> int:
    if isinstance(normalization, str) and normalization in NORMALIZATIONS:
        return NORMALIZATIONS[normalization]
    raise ValueError(f"{name} must be one of {', '.join(map(repr, NORMALIZATIONS))}, got {normalization!r}")


def _matrix(name: str, value, num_classes: int, *, dtype, device) -> torch.Tensor:
    """A coefficient as a (C, C) matrix: a number times I, a vector on the diagonal, or the matrix itself (kept
    differentiable where it is a tensor)."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=dtype)
    if t.is_complex() or not (t.is_floating_point() or isinstance(value, (numbers.Real, Sequence))):
        raise InputTypeError(f"{name} must be a number, a (C,) vector or a (C, C) matrix, got {describe(value)}")
    t = t.to(dtype=dtype, device=device)
    if t.ndim == 0:
        return t * torch.eye(num_classes, dtype=dtype, device=device)
    if t.ndim == 1 and t.shape[0] == num_classes:
        return torch.diag(t)
    if t.ndim == 2 and tuple(t.shape) == (num_classes, num_classes):
        return t
    raise ValueError(
        f"{name} must be a number, a ({num_classes},) vector or a ({num_classes}, {num_classes}) matrix "
        f"for {num_classes} classes, got shape {tuple(t.shape)}"
    )


def _per_kernel(name: str, value, count: int) -> list:
    """A list or tuple holds one value per kernel; anything else (a number, a tensor) is every kernel's."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"{name} given as a sequence needs one value per kernel ({count}), got {len(value)}; "
                "give a vector or matrix shared by every kernel as a tensor"
            )
        return list(value)
    return [value] * count


def kernel_lattice(
    name: str, kernel: KernelInput, batch: int, spatial, dtype, backend, compact: bool = False
) -> list[torch.Tensor]:
    """A kernel's built lattice: from (B or 1, d, *spatial) features, a :class:`PermutohedralLattice` or its tensors."""
    num_points = math.prod(spatial)
    if isinstance(kernel, PermutohedralLattice):
        kernel = kernel.tensors
    if isinstance(kernel, (list, tuple)):
        tensors = list(kernel)
        if len(tensors) != len(FIELDS) or tensors[1].dtype != dtype:
            raise ValueError(
                f"{name}: a built lattice must be {len(FIELDS)} tensors in {dtype}, got "
                f"{len(tensors)} tensors" + (f" in {tensors[1].dtype}" if tensors else "")
            )
        points = tensors[0].shape[0]
        if points not in (num_points, batch * num_points):
            raise ValueError(
                f"{name}: the lattice was built over {points} points, not the unary's {num_points} "
                f"(batch 1) or {batch * num_points} (batch {batch})"
            )
        return tensors
    if not isinstance(kernel, torch.Tensor) or not kernel.is_floating_point():
        raise InputTypeError(
            f"{name} must be a floating (B, d, *spatial) features tensor or a built lattice, got {describe(kernel)}"
        )
    if (
        kernel.ndim != 2 + len(spatial)
        or tuple(kernel.shape[2:]) != tuple(spatial)
        or kernel.shape[0] not in (1, batch)
        or kernel.shape[1] < 1
    ):
        raise ValueError(
            f"{name} must have shape ({batch} or 1, d, {', '.join(map(str, spatial))}) to match the "
            f"unary, got {tuple(kernel.shape)}"
        )
    features = kernel.detach().to(dtype)
    points = features.reshape(features.shape[0], features.shape[1], num_points).transpose(1, 2).contiguous()
    if torch.compiler.is_compiling():
        return build_tensors(points, backend, 1, compact)
    try:
        return build_tensors(points, backend, 1, compact)
    except ValueError as error:  # name the kernel whose features are out of range
        raise ValueError(f"{name}: {error}") from None


def dense_crf(
    unary: torch.Tensor,
    features: Sequence[KernelInput],
    weights: Coefficient | Sequence[Coefficient] = 1.0,
    compatibility: Coefficient | Sequence[Coefficient] = -1.0,
    *,
    normalization: Normalization | Sequence[Normalization] = "symmetric",
    num_iterations: int = 5,
    unary_kind: Literal["scores", "energies"] = "scores",
    backend: str = "auto",
    compact: bool = False,
) -> torch.Tensor:
    """Mean-field inference of a dense CRF with one Gaussian kernel per entry of ``features``.

    Each iteration computes ``q = u − Σ_k norm_k(K_k softmax(q)) (M_k W_k)ᵀ`` from ``q = u`` (see the module's
    documentation); differentiable with respect to ``unary``, ``weights`` and ``compatibility`` (not the features).
    Lattices are built once per call (or passed in, built once for many calls) and reused by every iteration and by
    backward. The CRF computes in float32 (float64 stays float64); half inputs come back in their dtype, and under
    autocast the result is float32.

    Args:
        unary: (B, C, *spatial) unary scores (log-probabilities or logits: higher is more likely) or, with
            ``unary_kind="energies"``, energies (``−log p``, as pydensecrf takes them). 1 to 3 spatial dimensions.
        features: per kernel, (B, d, *spatial) features already divided by their bandwidths (batch 1: one lattice
            shared by the batch; see :func:`position_features` and :func:`guided_features`), or a
            :class:`~crfasrnn.lattice.PermutohedralLattice` (or its ``tensors``) built from them.
        weights: the kernels' weights ``W_k``: a number, a (C,) per-class vector or a (C, C) matrix (as tensors); a
            list or tuple gives one per kernel, anything else is every kernel's.
        compatibility: the label compatibility ``M_k`` in the same forms; ``-1`` (the default) is the Potts model.
        normalization: ``"none"``, ``"before"``, ``"after"`` or ``"symmetric"``, for all kernels or one each.
        num_iterations: mean-field iterations T >= 0 (0 returns the unary scores).
        unary_kind: ``"scores"`` or ``"energies"``.
        backend: lattice back end (``"auto"``, ``"torch"`` or ``"numba"``).
        compact: build compact lattices (numba: no splat lists, about half the memory per point; the splat's sums run
            in another order, so results differ in the last bits; see :class:`~crfasrnn.lattice.PermutohedralLattice`).

    Returns:
        (B, C, *spatial) scores ``q`` (a softmax over C gives the marginals ``Q``).

    Shape:
        - unary: (B, C, *spatial), 1 <= len(spatial) <= 3
        - features[k]: (B, d_k, *spatial) or (1, d_k, *spatial)
        - output: (B, C, *spatial)

    Example:
        >>> image = torch.rand(2, 3, 24, 32) * 255
        >>> unary = torch.randn(2, 4, 24, 32)
        >>> smooth = position_features((24, 32), 3.0)
        >>> appearance = guided_features(image, 80.0, 13.0)
        >>> scores = dense_crf(unary, [smooth, appearance], weights=[3.0, 10.0])
        >>> scores.shape
        torch.Size([2, 4, 24, 32])
    """
    if not isinstance(unary, torch.Tensor) or not unary.is_floating_point() or not 3 <= unary.ndim <= 5:
        raise ValueError(
            f"unary must be a floating (B, C, *spatial) tensor with 1 to 3 spatial dimensions, got {describe(unary)}"
        )
    require(min(unary.shape) >= 1, f"unary must not be empty, got shape {tuple(unary.shape)}")
    kernels = list(features) if isinstance(features, (list, tuple)) else None
    if not kernels:
        raise ValueError(
            f"features must be a non-empty sequence of one features tensor (or lattice) per kernel, got "
            f"{describe(features)}"
        )
    count = len(kernels)
    weight_list = _per_kernel("weights", weights, count)
    compat_list = _per_kernel("compatibility", compatibility, count)
    norms = normalization if isinstance(normalization, (list, tuple)) else [normalization] * count
    if len(norms) != count:
        raise ValueError(f"normalization needs one name or {count} (one per kernel), got {len(norms)}")
    modes = [_mode("normalization", n) for n in norms]
    if unary_kind not in ("scores", "energies"):
        raise ValueError(f"unary_kind must be 'scores' or 'energies', got {unary_kind!r}")
    check_iterations(num_iterations)
    backend = resolve_backend(backend, unary.device)
    if num_iterations == 0:
        return -unary if unary_kind == "energies" else unary

    with precision(unary) as (dtype, out_dtype):
        b, c = unary.shape[:2]
        spatial = tuple(unary.shape[2:])
        lattices = [
            kernel_lattice(f"features[{k}]", kernel, b, spatial, dtype, backend, compact)
            for k, kernel in enumerate(kernels)
        ]
        mixing = [
            (
                _matrix(f"compatibility[{k}]", m, c, dtype=dtype, device=unary.device)
                @ _matrix(f"weights[{k}]", w, c, dtype=dtype, device=unary.device)
            )
            .t()
            .contiguous()
            for k, (w, m) in enumerate(zip(weight_list, compat_list))
        ]
        return mean_field_scores(
            unary, lattices, mixing, modes, num_iterations, unary_kind == "energies", dtype, out_dtype
        )


def mean_field_scores(
    unary: torch.Tensor,
    lattices: Sequence[Sequence[torch.Tensor]],
    mixing: Sequence[torch.Tensor],
    modes: Sequence[int],
    num_iterations: int,
    energies: bool,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The engine's core, after the checks: (B, C, *spatial) unary in, scores out, through ``crfasrnn::mean_field``.

    ``lattices`` are built (lists of tensors, over B·N or N points), ``mixing`` the (C, C) matrices ``A_k = (M_k
    W_k)ᵀ`` in ``dtype``, ``modes`` the operators' normalisation codes; ``num_iterations`` >= 1.
    """
    b, c = unary.shape[:2]
    spatial = unary.shape[2:]
    n = math.prod(spatial)
    channels_last = unary.to(dtype).reshape(b, c, n).transpose(1, 2)  # point layout: the lattices' native layout
    if torch.is_grad_enabled() and channels_last.requires_grad:
        u = (-channels_last if energies else channels_last).contiguous()
    else:  # one pass, negated and laid out at once
        u = torch.empty((b, n, c), dtype=dtype, device=unary.device)
        torch.neg(channels_last, out=u) if energies else u.copy_(channels_last)
    q = mean_field_points(u, lattices, mixing, modes, num_iterations)
    return q.transpose(1, 2).reshape(b, c, *spatial).contiguous().to(out_dtype)


def marginals_points(scores: torch.Tensor) -> torch.Tensor:
    """The marginals ``Q = softmax(q)`` of (B, N, C) scores in point layout (one compiled pass on the CPU, where
    torch's softmax over a few classes is slow)."""
    return _mean_field.softmax(scores)


def mean_field_points(
    u: torch.Tensor,
    lattices: Sequence[Sequence[torch.Tensor]],
    mixing: Sequence[torch.Tensor],
    modes: Sequence[int],
    num_iterations: int,
) -> torch.Tensor:
    """``crfasrnn::mean_field`` over (B, N, C) contiguous unary scores in point layout; returns the (B, N, C) scores.

    Saves what backward needs only where a gradient is wanted.
    """
    save = torch.is_grad_enabled() and (u.requires_grad or any(a.requires_grad for a in mixing))
    flat = [t for lattice in lattices for t in lattice]
    q, _ = torch.ops.crfasrnn.mean_field(u, flat, list(mixing), [int(m) for m in modes], num_iterations, save)
    return q


# --- the module -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianKernel:
    """One Gaussian kernel of a :class:`DenseCRF`: what its features are, its initial weight and its normalisation.

    A kernel's features are the positions divided by ``positions`` (a bandwidth per axis, in the units of the call's
    ``spacing``), then the guide's channels divided by ``guide`` (a bandwidth per channel; an infinite one leaves the
    channel out). A kernel with neither takes its features from the call (``features=``), already divided.

    Args:
        positions: positional bandwidth: one number or one per spatial axis (array-axis order); None: no positions.
        guide: guide bandwidth: one number for every guide channel or one per channel; None: the guide is not used.
        weight: initial weight: a number, a per-class vector or a (C, C) matrix (learnable in that form).
        normalization: ``"none"``, ``"before"``, ``"after"`` or ``"symmetric"``.

    Example:
        >>> GaussianKernel(positions=3.0, weight=3.0)
        GaussianKernel(positions=3.0, guide=None, weight=3.0, normalization='symmetric')
    """

    positions: float | tuple[float, ...] | None = None
    guide: float | tuple[float, ...] | None = None
    weight: Coefficient = 1.0
    normalization: Normalization = "symmetric"

    def __post_init__(self) -> None:
        for name in ("positions", "guide"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            if value is not None:
                count = 1 if isinstance(value, numbers.Real) else len(value)
                per_axis(name, value, count, allow_inf=name == "guide")
        _mode("normalization", self.normalization)

    @property
    def given(self) -> bool:
        """Whether the kernel's features come with each call (it has neither positions nor a guide)."""
        return self.positions is None and self.guide is None


class DenseCRF(nn.Module):
    """A dense CRF over signals, images or volumes with any Gaussian kernels (see :mod:`crfasrnn.engine`).

    Args:
        num_classes: number of labels C.
        kernels: the pairwise kernels (at least one).
        num_iterations: mean-field iterations.
        compatibility: initial label compatibility ``M`` shared by the kernels: a number (times I; ``-1`` is Potts), a
            per-class vector or a (C, C) matrix (learnable in that form).
        unary_kind: ``"scores"`` (log-probabilities, logits) or ``"energies"`` (``−log p``).
        learnable: make the weights and the compatibility parameters (else buffers).
        backend: lattice back end (``"auto"``, ``"torch"`` or ``"numba"``).
        compact: build compact lattices (see :func:`dense_crf`): for large volumes, where memory counts.

    The weights are the parameters ``weights.0``, ``weights.1``, … and the compatibility ``compatibility``. Lattices
    over positions alone depend only on the size and the spacing: outside compiled graphs they are built once per size
    and kept.

    Shape:
        - unary: (B, C, *spatial) with 1 to 3 spatial dimensions
        - guide: (B, G, *spatial), where a kernel uses it
        - features: one (B or 1, d, *spatial) tensor per kernel without positions and guide
        - output: (B, C, *spatial) scores (a softmax over C gives the marginals)

    Example:
        >>> crf = DenseCRF(2, [GaussianKernel(positions=2.0, weight=1.0),
        ...                    GaussianKernel(positions=(1.0, 4.0, 4.0), guide=0.1, weight=2.0)])
        >>> volume = torch.rand(1, 1, 8, 16, 16)
        >>> crf(torch.randn(1, 2, 8, 16, 16), volume, spacing=(3.0, 1.0, 1.0)).shape
        torch.Size([1, 2, 8, 16, 16])
    """

    def __init__(
        self,
        num_classes: int,
        kernels: Sequence[GaussianKernel],
        *,
        num_iterations: int = 5,
        compatibility: Coefficient = -1.0,
        unary_kind: Literal["scores", "energies"] = "scores",
        learnable: bool = True,
        backend: str = "auto",
        compact: bool = False,
    ) -> None:
        super().__init__()
        check_count("num_classes", num_classes, minimum=1)
        kernels = list(kernels)
        if not kernels or not all(isinstance(k, GaussianKernel) for k in kernels):
            raise ValueError("kernels must be a non-empty sequence of GaussianKernel")
        if unary_kind not in ("scores", "energies"):
            raise ValueError(f"unary_kind must be 'scores' or 'energies', got {unary_kind!r}")
        if backend not in ("auto", "torch", "numba"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
        self.num_classes = num_classes
        self.kernels = tuple(kernels)
        self.num_iterations = check_iterations(num_iterations)
        self.unary_kind = unary_kind
        self.backend = backend
        self.compact = bool(compact)

        def coefficient(name: str, value) -> torch.Tensor:
            t = torch.as_tensor(value, dtype=torch.float32).clone()
            _matrix(name, t, num_classes, dtype=torch.float32, device=t.device)  # validates the form
            return t

        weights = [coefficient(f"kernels[{k}].weight", kernel.weight) for k, kernel in enumerate(kernels)]
        compat = coefficient("compatibility", compatibility)
        if learnable:
            self.weights = nn.ParameterList([nn.Parameter(w) for w in weights])
            self.compatibility = nn.Parameter(compat)
        else:
            for k, w in enumerate(weights):
                self.register_buffer(f"weight_{k}", w)
            self.register_buffer("compatibility", compat)
        self._learnable = learnable

    def _weights(self) -> list[torch.Tensor]:
        if self._learnable:
            return list(self.weights)
        return [getattr(self, f"weight_{k}") for k in range(len(self.kernels))]

    def forward(
        self,
        unary: torch.Tensor,
        guide: torch.Tensor | None = None,
        *,
        features: Sequence[torch.Tensor] | None = None,
        spacing: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Run ``num_iterations`` mean-field steps; see :func:`dense_crf`.

        Args:
            unary: (B, C, *spatial) scores or energies.
            guide: (B, G, *spatial) guide channels, for the kernels with a guide bandwidth.
            features: the features of the kernels without positions and guide, in order.
            spacing: the distance between neighbouring points along each axis (one number or one per axis).
        """
        if not isinstance(unary, torch.Tensor) or not unary.is_floating_point() or not 3 <= unary.ndim <= 5:
            raise ValueError(
                f"unary must be a floating (B, C, *spatial) tensor with 1 to 3 spatial dimensions, got "
                f"{describe(unary)}"
            )
        require(
            unary.shape[1] == self.num_classes,
            f"unary has {unary.shape[1]} classes but the CRF has {self.num_classes} (shape {tuple(unary.shape)})",
        )
        spatial = tuple(unary.shape[2:])
        dtype = compute_dtype(unary.dtype)
        backend = resolve_backend(self.backend, unary.device)
        if any(k.guide is not None for k in self.kernels):
            if guide is None:
                raise ValueError("a kernel has a guide bandwidth but no guide was given")
            if (
                not isinstance(guide, torch.Tensor)
                or guide.ndim != unary.ndim
                or guide.shape[0] != unary.shape[0]
                or tuple(guide.shape[2:]) != spatial
            ):
                raise ValueError(
                    f"guide must have shape ({unary.shape[0]}, G, {', '.join(map(str, spatial))}) to "
                    f"match the unary {tuple(unary.shape)}, got {describe(guide)}"
                )
            if guide.device != unary.device:
                raise ValueError(f"guide is on {guide.device} but unary is on {unary.device}")
        given = list(features) if features is not None else []
        wanted = sum(k.given for k in self.kernels)
        if len(given) != wanted:
            raise ValueError(
                f"the CRF has {wanted} kernel(s) whose features come with the call, got {len(given)} features tensors"
            )
        inputs: list[KernelInput] = []
        supplied = iter(given)
        for k, kernel in enumerate(self.kernels):
            if kernel.given:
                inputs.append(next(supplied))
            elif kernel.guide is None:
                assert kernel.positions is not None  # a kernel over nothing is refused by GaussianKernel
                check_position_extent(
                    f"kernels[{k}].positions", spatial, kernel.positions, spacing, len(spatial), dtype
                )
                inputs.append(
                    position_lattice_tensors(
                        spatial, kernel.positions, spacing, unary.device, dtype, backend, self.compact
                    )
                )
            else:
                assert guide is not None  # a guided kernel without a guide is refused above
                guided = guided_features(
                    guide.detach().to(dtype),
                    kernel.positions,
                    _guide_bandwidths(kernel.guide, guide.shape[1]),
                    spacing=spacing,
                )
                if kernel.positions is not None:  # (over the kernel's own dimension: the channels it keeps)
                    check_position_extent(
                        f"kernels[{k}].positions", spatial, kernel.positions, spacing, guided.shape[1], dtype
                    )
                inputs.append(guided)
        return dense_crf(
            unary,
            inputs,
            self._weights(),
            self.compatibility,
            normalization=[k.normalization for k in self.kernels],
            num_iterations=self.num_iterations,
            unary_kind=self.unary_kind,
            backend=backend,
            compact=self.compact,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_iterations={self.num_iterations}, unary_kind={self.unary_kind!r}, "
            f"kernels={list(self.kernels)}"
        )


def _guide_bandwidths(bandwidth, channels: int):
    if isinstance(bandwidth, numbers.Real) or len(bandwidth) == channels:
        return bandwidth
    raise ValueError(
        f"a guide bandwidth per channel needs {channels} values for a guide of {channels} channels, got "
        f"{len(bandwidth)}"
    )


def check_position_extent(
    name: str,
    spatial: Sequence[int],
    bandwidth: float | Sequence[float],
    spacing: float | Sequence[float] | None,
    dim: int,
    dtype: torch.dtype,
) -> None:
    """Refuse a positional bandwidth too small for the lattice, before one is built (no sync: positions are known from
    the size alone). ``name`` is the parameter's, as the user knows it; ``dim`` the lattice's number of features.

    Example:
        >>> check_position_extent("theta", (30, 40), 1e-20, None, 2, torch.float32)
        Traceback (most recent call last):
        ...
        ValueError: theta=1e-20 is too small for a 30x40 image: ...
    """
    bandwidths = per_axis(name, bandwidth, len(spatial))
    spacings = (1.0,) * len(spatial) if spacing is None else per_axis("spacing", spacing, len(spatial))
    extent = max((s - 1) * sp / bw for s, sp, bw in zip(spatial, spacings, bandwidths))
    limit = max_feature_magnitude(dim, dtype)
    if extent > limit:
        if isinstance(bandwidth, Sequence):
            given, fix = repr(tuple(bandwidth)), f"multiply it by at least {extent / limit:.3g}"
        else:
            given, fix = f"{bandwidth:g}", f"use {name} >= {float(bandwidth) * extent / limit:.3g}"
        kind = {1: "signal", 2: "image", 3: "volume"}.get(len(spatial), "grid")
        raise ValueError(
            f"{name}={given} is too small for a {'x'.join(map(str, spatial))} {kind}: the positions would reach "
            f"{extent:.3g} bandwidths, beyond the {limit:.3g} the lattice handles with {dim} features (one simplex "
            f"per point: the kernel would be nearly the identity); {fix}"
        )


def position_lattice_tensors(spatial, bandwidth, spacing, device, dtype, backend, compact=False) -> list[torch.Tensor]:
    """The lattice of a kernel over positions alone: built in the graph when compiling, else kept per size."""
    bandwidths = per_axis("positions", bandwidth, len(spatial))
    spacings = None if spacing is None else per_axis("spacing", spacing, len(spatial))
    if torch.compiler.is_compiling() or device.type == "meta" or _tracing():  # nothing to keep: no data
        return build_position_lattice(spatial, bandwidths, spacings, device, dtype, backend, compact)
    return cached_position_lattice(tuple(spatial), bandwidths, spacings, device, dtype, backend, compact)


def position_lattice(
    spatial_shape: Sequence[int],
    bandwidth: float | Sequence[float],
    *,
    spacing: float | Sequence[float] | None = None,
    like: torch.Tensor | None = None,
    backend: str = "auto",
    compact: bool = False,
) -> PermutohedralLattice:
    """The lattice of a Gaussian kernel over positions alone (:func:`position_features`), for one grid and any batch.

    It depends only on the size, the bandwidths and the spacing: outside compiled graphs the last few are kept, so
    that a second CRF over the same size reuses it (as Caffe builds its spatial lattice once, at set-up).

    Args:
        spatial_shape, bandwidth, spacing: as in :func:`position_features`.
        like: a tensor whose dtype (float32 or float64) and device the lattice takes (float32 on the CPU by default).
        backend: lattice back end (``"auto"``, ``"torch"`` or ``"numba"``).
        compact: a compact lattice (see :func:`dense_crf`).

    Example:
        >>> lattice = position_lattice((24, 32), 3.0)
        >>> lattice.filter_points(torch.ones(1, 24 * 32, 1), normalize=True).shape
        torch.Size([1, 768, 1])
    """
    shape = tuple(int(s) for s in spatial_shape)
    dtype = compute_dtype(torch.float32 if like is None else like.dtype)
    device = torch.device("cpu") if like is None else like.device
    backend = resolve_backend(backend, device)
    check_position_extent("bandwidth", shape, bandwidth, spacing, len(shape), dtype)
    tensors = position_lattice_tensors(shape, bandwidth, spacing, device, dtype, backend, compact)
    return PermutohedralLattice.from_tensors(tensors, math.prod(shape))


def _tracing() -> bool:
    """Whether a fake-tensor or tracing mode is active (e.g. ``opcheck``'s fake run): its tensors must not be kept."""
    return any(
        torch._C._get_dispatch_mode(key) is not None
        for key in (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)
    )


def build_position_lattice(spatial, bandwidths, spacings, device, dtype, backend, compact=False) -> list[torch.Tensor]:
    """The lattice over the positions of one (batch-1) grid, shared by a batch."""
    like = torch.empty(0, dtype=dtype, device=device)
    features = position_features(spatial, bandwidths, spacing=spacings, like=like)
    n = math.prod(spatial)
    return build_tensors(features.reshape(1, len(spatial), n).transpose(1, 2).contiguous(), backend, 1, compact)


@functools.lru_cache(maxsize=4)
def cached_position_lattice(spatial, bandwidths, spacings, device, dtype, backend, compact=False) -> list[torch.Tensor]:
    """:func:`build_position_lattice`, kept for the last few sizes (as Caffe builds its spatial lattice at set-up)."""
    with torch.no_grad():
        return build_position_lattice(spatial, bandwidths, spacings, device, dtype, backend, compact)
