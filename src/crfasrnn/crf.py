"""The CRF-RNN layer: mean-field inference of a fully connected CRF as a recurrent, differentiable layer.

Zheng, Jayasumana, Romera-Paredes, Vineet, Su, Du, Huang and Torr, *Conditional Random Fields as Recurrent Neural
Networks*, ICCV 2015. The pairwise potentials are the two Gaussian kernels of Krähenbühl and Koltun's dense CRF (NIPS
2011), a spatial (smoothness) kernel over pixel positions and a bilateral (appearance) kernel over positions and
colours, filtered with the permutohedral lattice (:mod:`crfasrnn.lattice`).

Conventions (the Caffe original's and the paper's): the unary input is a score (a logit, the *negative* unary energy);
each iteration computes ``Q = U - M @ (W_s @ S + W_b @ B)`` with the compatibility matrix ``M`` initialised to ``-I``
(Potts). The PyTorch port stores ``-M``; :mod:`crfasrnn.weights` converts its files.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import nn

from ._checks import check_finite, check_iterations, check_positive, check_same_device, check_tensor, require
from ._precision import precision
from .engine import (
    check_position_extent,
    guided_features,
    kernel_lattice,
    mean_field_scores,
    position_features,
    position_lattice_tensors,
)
from .errors import InputTypeError
from .higher_order import (
    Detections,
    HigherOrderPotentials,
    SuperpixelPotential,
    Superpixels,
    mean_field_higher_order,
)
from .lattice import NORMALIZE_AFTER, resolve_backend

__all__ = ["CrfRnn", "bilateral_features", "crf_rnn", "set_finite_check", "spatial_features"]

FiniteCheck = Literal["cpu", "always", "never"]
_FINITE_CHECK: list[FiniteCheck] = ["cpu"]


def set_finite_check(mode: FiniteCheck) -> FiniteCheck:
    """Choose when :func:`crf_rnn` and :class:`CrfRnn` scan their inputs for NaN and Inf; returns the previous mode.

    The scan is one reduction over each input, and its answer must come back to the host before the layer can raise,
    so on CUDA it waits for the device. Modes:

    * ``"cpu"`` (the default): scan CPU tensors only;
    * ``"always"``: scan CUDA tensors too (a device synchronisation per call);
    * ``"never"``: no scan (a non-finite input then gives non-finite scores).

    Inside ``torch.compile``/``torch.export`` graphs the scan never runs: it would break the graph.

    Example:
        >>> previous = set_finite_check("never")
        >>> set_finite_check(previous)
        'never'
    """
    if mode not in ("cpu", "always", "never"):
        raise ValueError(f"finite-check mode must be 'cpu', 'always' or 'never', got {mode!r}")
    previous, _FINITE_CHECK[0] = _FINITE_CHECK[0], mode
    return previous


def spatial_features(height: int, width: int, theta_gamma: float, *, like: torch.Tensor) -> torch.Tensor:
    """Features of the spatial kernel: ``(x / θγ, y / θγ)`` with x the column and y the row, 0-based (docs/reference.md
    §2.1).

    Args:
        height, width: image size in pixels.
        theta_gamma: spatial bandwidth θγ in pixels.
        like: a tensor whose dtype and device the features take.

    Returns:
        (1, 2, H, W) features (the same for every image of a batch).
    """
    return position_features((height, width), theta_gamma, like=like)


def bilateral_features(image: torch.Tensor, theta_alpha: float, theta_beta: float) -> torch.Tensor:
    """Features of the bilateral kernel: ``(x/θα, y/θα, I0/θβ, I1/θβ, I2/θβ)`` (docs/reference.md §2.1).

    Args:
        image: (B, 3, H, W) colour channels in the units θβ refers to, used in tensor order.
        theta_alpha: positional bandwidth θα in pixels.
        theta_beta: colour bandwidth θβ in the image's units.

    Returns:
        (B, 5, H, W) features.
    """
    return guided_features(image, theta_alpha, theta_beta)


def _check_inputs(
    unary: torch.Tensor, image: torch.Tensor, num_classes: int | None, parameter_device: torch.device | None = None
) -> None:
    """Shape, dtype and device checks (``torch._check_*``: no host sync, no graph break), then the optional NaN scan."""
    for name, t in (("unary", unary), ("image", image)):
        check_tensor(name, t, layout="a 4-D tensor (B, C, H, W)", ndim=4, kind="floating")
    require(image.shape[1] == 3, f"image must have 3 channels (B, 3, H, W), got shape {tuple(image.shape)}")
    require(
        unary.shape[0] == image.shape[0] and unary.shape[2] == image.shape[2] and unary.shape[3] == image.shape[3],
        f"unary {tuple(unary.shape)} and image {tuple(image.shape)} must have the same batch size and H, W",
    )
    if num_classes is not None:
        require(
            unary.shape[1] == num_classes,
            f"unary has {unary.shape[1]} classes but the layer has {num_classes} (shape {tuple(unary.shape)})",
        )
    check_same_device("unary", unary, "image", image.device)
    if parameter_device is not None:
        check_same_device("unary", unary, "the layer's parameters", parameter_device)
    mode = _FINITE_CHECK[0]
    if mode == "never" or torch.compiler.is_compiling() or (mode == "cpu" and unary.device.type != "cpu"):
        return
    if unary.device.type == "meta" or _is_fake(unary):  # no data to scan (shape propagation)
        return
    check_finite("unary", unary)
    check_finite("image", image)


def _is_fake(tensor: torch.Tensor) -> bool:
    fake = sys.modules.get(
        "torch._subclasses.fake_tensor"
    )  # not imported: no fake tensor exists (and none is paid for)
    return fake is not None and fake.is_fake(tensor)


def crf_rnn(
    unary: torch.Tensor,
    image: torch.Tensor,
    spatial_weights: torch.Tensor,
    bilateral_weights: torch.Tensor,
    compatibility: torch.Tensor,
    *,
    num_iterations: int = 5,
    theta_alpha: float = 160.0,
    theta_beta: float = 3.0,
    theta_gamma: float = 3.0,
    backend: str = "auto",
    higher_order: HigherOrderPotentials | None = None,
    detections: Detections | None = None,
    superpixels: Superpixels | None = None,
) -> torch.Tensor:
    """Mean-field inference of the dense CRF, unrolled for ``num_iterations`` steps (functional form of
    :class:`CrfRnn`).

    Per iteration: ``P = softmax(Q)``, ``S = n_s ⊙ K_s P``, ``B = n_b ⊙ K_b P`` with ``n = 1 / (K·1 + ε)``, and
    ``Q = U − M @ (W_s @ S + W_b @ B)``, starting from ``Q = U``. The lattices are built once per call (one per image
    for the bilateral kernel, one shared spatial lattice) and reused in every iteration and in backward.

    Args:
        unary: (B, C, H, W) unary scores (logits; higher means more likely).
        image: (B, 3, H, W) the colours of the bilateral kernel, in the units of ``theta_beta`` (0..255 for photos).
        spatial_weights: (C, C) spatial kernel weights W_s.
        bilateral_weights: (C, C) bilateral kernel weights W_b.
        compatibility: (C, C) label compatibility M (``-I`` is the Potts model).
        num_iterations: mean-field iterations T >= 0; 0 returns ``unary``.
        theta_alpha: positional bandwidth of the bilateral kernel, in pixels.
        theta_beta: colour bandwidth of the bilateral kernel, in image units.
        theta_gamma: bandwidth of the spatial kernel, in pixels.
        backend: lattice back end (``"auto"``, ``"torch"`` or ``"numba"``).
        higher_order: the weights of the higher-order potentials
            (:class:`~crfasrnn.higher_order.HigherOrderPotentials`), needed where ``detections`` or ``superpixels``
            are given.
        detections: object detections of the batch (:class:`~crfasrnn.higher_order.Detections`, at the image size).
        superpixels: superpixel segmentations of the batch (:class:`~crfasrnn.higher_order.Superpixels`).

    Returns:
        (B, C, H, W) unnormalised scores Q^T (apply a softmax for marginals).
    """
    _check_inputs(unary, image, None)
    return _crf_rnn(
        unary,
        image,
        spatial_weights,
        bilateral_weights,
        compatibility,
        num_iterations,
        theta_alpha,
        theta_beta,
        theta_gamma,
        backend,
        higher_order,
        detections,
        superpixels,
    )


def _crf_rnn(
    unary,
    image,
    spatial_weights,
    bilateral_weights,
    compatibility,
    num_iterations,
    theta_alpha,
    theta_beta,
    theta_gamma,
    backend,
    higher_order=None,
    detections=None,
    superpixels=None,
):
    """:func:`crf_rnn` after the input checks (which :class:`CrfRnn` makes itself, once)."""
    num_classes = unary.shape[1]
    for name, m in (
        ("spatial_weights", spatial_weights),
        ("bilateral_weights", bilateral_weights),
        ("compatibility", compatibility),
    ):
        if m.shape != (num_classes, num_classes):
            raise ValueError(
                f"{name} must be ({num_classes}, {num_classes}) for {num_classes} classes, got {tuple(m.shape)}"
            )
    check_iterations(num_iterations)
    theta_alpha = check_positive("theta_alpha", theta_alpha)
    theta_beta = check_positive("theta_beta", theta_beta)
    theta_gamma = check_positive("theta_gamma", theta_gamma)
    backend = resolve_backend(backend, unary.device)
    higher = _check_higher_order(unary, higher_order, detections, superpixels)
    if num_iterations == 0:
        return unary

    with precision(unary) as (dtype, out_dtype):
        b, _, h, w = unary.shape
        check_position_extent("theta_gamma", (h, w), theta_gamma, None, 2, dtype)  # the spatial kernel's
        check_position_extent("theta_alpha", (h, w), theta_alpha, None, 5, dtype)  # the bilateral kernel's
        features = bilateral_features(image.detach().to(dtype), theta_alpha, theta_beta)
        bilateral = kernel_lattice(
            f"bilateral kernel (theta_alpha={theta_alpha:g}, theta_beta={theta_beta:g})",
            features,
            b,
            (h, w),
            dtype,
            backend,
        )
        spatial = position_lattice_tensors((h, w), theta_gamma, None, unary.device, dtype, backend)
        # The engine's q = u − Σ_k msg_k (M W_k)ᵀ with the shared compatibility M, both kernels normalised after.
        matrices = [m.to(dtype) for m in (spatial_weights, bilateral_weights, compatibility)]
        mixing = [(matrices[2] @ matrices[0]).t().contiguous(), (matrices[2] @ matrices[1]).t().contiguous()]
        after = NORMALIZE_AFTER  # CRF-RNN's normalisation: n ⊙ K p
        if not higher:
            return mean_field_scores(
                unary, [spatial, bilateral], mixing, [after, after], num_iterations, False, dtype, out_dtype
            )
        # the higher-order potentials: the same lattices and matrices, iterations unrolled in torch operations
        c = unary.shape[1]
        u = unary.to(dtype).reshape(b, c, h * w).transpose(1, 2).contiguous()
        q, _ = mean_field_higher_order(
            u, [spatial, bilateral], mixing, [after, after], num_iterations, higher_order, detections, superpixels
        )
        return q.transpose(1, 2).reshape(b, c, h, w).contiguous().to(out_dtype)


def _check_higher_order(
    unary: torch.Tensor,
    higher_order: HigherOrderPotentials | None,
    detections: Detections | None,
    superpixels: Superpixels | None,
) -> bool:
    """Whether the higher-order potentials take part; their inputs must fit the unary (B, C, H, W)."""
    b, c, h, w = unary.shape
    if detections is not None:
        if not isinstance(detections, Detections):
            raise InputTypeError(
                f"detections must be crfasrnn.higher_order.Detections, got {type(detections).__name__}"
            )
        if higher_order is None or not higher_order.detections:
            raise ValueError(
                "detections were given, but this CRF has no detection potential: CrfRnn(..., detections=True)"
            )
        require(
            detections.batch_size == b and detections.size == (h, w),
            f"detections are for {detections.batch_size} image(s) of {detections.size} (H, W), the unary "
            f"{tuple(unary.shape)}",
        )
        check_same_device("detections", detections.masks, "unary", unary.device)
        labels = detections.labels
        scan = labels.device.type == "cpu" or _FINITE_CHECK[0] == "always"  # (reading it back syncs a GPU)
        if scan and not torch.compiler.is_compiling() and labels.numel() and not _is_fake(labels):
            top = int(labels.max())
            require(top < c, f"a detection has label {top}, beyond the unary's {c} classes")
    if superpixels is not None:
        if not isinstance(superpixels, Superpixels):
            raise InputTypeError(
                f"superpixels must be crfasrnn.higher_order.Superpixels, got {type(superpixels).__name__}"
            )
        scales = 0 if higher_order is None else higher_order.superpixel_scales
        if scales == 0:
            raise ValueError(
                "superpixels were given, but this CRF has no superpixel potential: CrfRnn(..., superpixel_scales=S)"
            )
        require(
            superpixels.num_scales == scales,
            f"the CRF takes {scales} superpixel scale(s), {superpixels.num_scales} were given",
        )
        require(
            superpixels.segments.shape[0] == b and superpixels.size == (h, w),
            f"superpixels {tuple(superpixels.segments.shape)} (B, S, H, W) do not fit the unary {tuple(unary.shape)}",
        )
        check_same_device("superpixels", superpixels.segments, "unary", unary.device)
    if higher_order is not None and higher_order.num_classes != c:
        raise ValueError(f"the higher-order potentials are for {higher_order.num_classes} classes, the unary has {c}")
    return higher_order is not None and (detections is not None or superpixels is not None)


class CrfRnn(nn.Module):
    """CRF-RNN: mean-field inference of a fully connected CRF as a recurrent layer (Zheng et al., ICCV 2015).

    Args:
        num_classes: number of labels C.
        num_iterations: mean-field iterations (5 in training and 10 at test in the paper; 0 returns the unary).
        theta_alpha: positional bandwidth θα of the bilateral (appearance) kernel, in pixels.
        theta_beta: colour bandwidth θβ of the bilateral kernel, in the units of ``image`` (0..255 for photos).
        theta_gamma: bandwidth θγ of the spatial (smoothness) kernel, in pixels.
        spatial_weight: initial diagonal of the spatial kernel weights W_s.
        bilateral_weight: initial diagonal of the bilateral kernel weights W_b.
        backend: lattice back end: ``"auto"`` (numba on CPU where installed, torch otherwise), ``"torch"``, ``"numba"``.
        detections: add the detection potential of Arnab et al. (ECCV 2016); ``forward`` then takes
            ``detections``.
        superpixel_scales: add the superpixel potential for this many segmentations: ``forward`` then takes
            ``superpixels``.
        superpixel_potential: ``"mean"`` (caffe-tvg's released form, the default) or ``"potts"`` (the paper's
            Pⁿ-Potts consistency); see :mod:`crfasrnn.higher_order`.

    Parameters (learnable, float32, (C, C)): ``spatial_weights`` (init ``spatial_weight·I``), ``bilateral_weights``
    (init ``bilateral_weight·I``) and ``compatibility`` (init ``−I``, the Potts model in the Caffe/paper sign
    convention ``Q = U − M @ msg``). The bandwidths are fixed. With higher-order potentials, ``higher_order`` (a
    :class:`~crfasrnn.higher_order.HigherOrderPotentials`) holds their weights; without, it is None and the state dict
    is the plain layer's.

    Shape:
        - unary: (B, C, H, W) scores (logits).
        - image: (B, 3, H, W) floating colours giving the bilateral features, in the units θβ refers to.
        - output: (B, C, H, W) unnormalised scores (no softmax).

    Example:
        >>> crf = CrfRnn(num_classes=3, num_iterations=5)
        >>> unary = torch.randn(2, 3, 20, 30)
        >>> image = torch.rand(2, 3, 20, 30) * 255
        >>> crf(unary, image).shape
        torch.Size([2, 3, 20, 30])
    """

    def __init__(
        self,
        num_classes: int,
        num_iterations: int = 5,
        *,
        theta_alpha: float = 160.0,
        theta_beta: float = 3.0,
        theta_gamma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 5.0,
        backend: str = "auto",
        detections: bool = False,
        superpixel_scales: int = 0,
        superpixel_potential: SuperpixelPotential = "mean",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        check_iterations(num_iterations)
        if backend not in ("auto", "torch", "numba"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
        self.num_classes = num_classes
        self.num_iterations = num_iterations
        self.theta_alpha = check_positive("theta_alpha", theta_alpha)
        self.theta_beta = check_positive("theta_beta", theta_beta)
        self.theta_gamma = check_positive("theta_gamma", theta_gamma)
        self.backend = backend
        eye = torch.eye(num_classes, dtype=torch.float32)
        self.spatial_weights = nn.Parameter(float(spatial_weight) * eye)
        self.bilateral_weights = nn.Parameter(float(bilateral_weight) * eye)
        self.compatibility = nn.Parameter(-eye.clone())
        self.higher_order = (
            HigherOrderPotentials(
                num_classes,
                detections=detections,
                superpixel_scales=superpixel_scales,
                superpixel_potential=superpixel_potential,
            )
            if detections or superpixel_scales
            else None
        )

    def forward(
        self,
        unary: torch.Tensor,
        image: torch.Tensor,
        detections: Detections | None = None,
        superpixels: Superpixels | None = None,
    ) -> torch.Tensor:
        """Run ``num_iterations`` mean-field steps; see :func:`crf_rnn`. ``detections`` and ``superpixels`` need a
        layer built with ``detections=True`` and ``superpixel_scales=S``."""
        _check_inputs(unary, image, self.num_classes, self.compatibility.device)
        return _crf_rnn(
            unary,
            image,
            self.spatial_weights,
            self.bilateral_weights,
            self.compatibility,
            self.num_iterations,
            self.theta_alpha,
            self.theta_beta,
            self.theta_gamma,
            self.backend,
            self.higher_order,
            detections,
            superpixels,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_iterations={self.num_iterations}, theta_alpha={self.theta_alpha}, "
            f"theta_beta={self.theta_beta}, theta_gamma={self.theta_gamma}"
        )
