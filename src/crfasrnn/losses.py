"""The dense-CRF loss of weakly supervised segmentation (Tang et al., *On Regularized Losses for Weakly-supervised CNN
Segmentation*, ECCV 2018), with the API of its reference code (meng-tang/rloss, ``DenseCRFLoss``).

For a network's softmax output S (N, K, H, W), a region of interest R (N, H, W) in {0, 1} and the bilateral affinity
W of each image (a Gaussian over ``(x/σ_xy, y/σ_xy, r/σ_rgb, g/σ_rgb, b/σ_rgb)``, filtered with the permutohedral
lattice), the loss is the relaxed normalised-cut-like energy

    loss = − weight · Σ_n Σ_k (R ⊙ S_k)ᵀ W (R ⊙ S_k) / N

which rewards giving the same label to pixels that are close and alike. It is added to the partial cross-entropy on
the labelled pixels of scribbles, clicks or boxes. As in rloss, the image, ROI and segmentation may first be scaled by
``scale_factor`` (nearest for the image and the ROI, bilinear for the segmentation), with ``σ_xy`` scaled with them.

Differences from rloss, none of which changes a value:

* the lattice is this package's (CPU and CUDA, batched, in the graph of ``torch.compile``), built with rloss's
  phantom vertices (``pad_to=4``, the SSE lattice's), so the filter's numbers are rloss's to float32 rounding;
* the gradient is rloss's, ``−2 W S / N`` (``gradient="rloss"``, the default), which treats the lattice's filter as
  the symmetric W it approximates; ``gradient="exact"`` gives the exact gradient of the value instead,
  ``−(W + Wᵀ) S / N`` (the lattice's blur along its axes in turn is not exactly symmetric: the two differ by about
  2 % in norm, see the tests), which is what ``gradcheck`` checks;
* the result is a 0-d tensor (rloss's is of shape (1,)), on the segmentation's device, and a ``reduction``
  (``"mean"``: rloss's average over the images, ``"sum"``, ``"none"``: one value per image) and the normalised
  affinity ``D^-1/2 W D^-1/2`` (``normalized=True``) are available in :func:`dense_crf_loss`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_finite, check_positive, check_tensor, require
from ._precision import precision
from .engine import guided_features
from .lattice import Backend, PermutohedralLattice

__all__ = ["DenseCRFLoss", "dense_crf_loss"]

Reduction = Literal["mean", "sum", "none"]
Gradient = Literal["rloss", "exact"]


def dense_crf_loss(
    images: torch.Tensor,
    segmentations: torch.Tensor,
    rois: torch.Tensor | None = None,
    *,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale_factor: float = 1.0,
    weight: float = 1.0,
    reduction: Reduction = "mean",
    normalized: bool = False,
    gradient: Gradient = "rloss",
    backend: Backend = "auto",
) -> torch.Tensor:
    """The dense-CRF loss ``− weight · Σ_k (R ⊙ S_k)ᵀ W (R ⊙ S_k)``, per image, reduced over the batch.

    Args:
        images: (N, 3, H, W) colours in 0..255 (the *unnormalised* images; rloss's ``denormalizeimage``), any
            floating or integer dtype, on any device (moved to the segmentation's).
        segmentations: (N, K, H, W) probabilities (a softmax output), the tensor differentiated.
        rois: optional (N, H, W) region of interest in {0, 1} (pixels outside it take no part); None: everywhere.
        sigma_rgb: colour bandwidth σ_rgb, in the images' 0..255 units.
        sigma_xy: spatial bandwidth σ_xy, in pixels of the images as given (scaled with ``scale_factor``).
        scale_factor: compute at this scale (rloss's down-scaling: nearest for images and ROIs, bilinear for the
            segmentations); 1 computes at full size.
        weight: the factor in front of the loss (rloss's ``weight``).
        reduction: ``"mean"`` (the average over the N images, as rloss), ``"sum"`` or ``"none"`` ((N,) values).
        normalized: use the normalised affinity ``D^-1/2 W D^-1/2`` (D = W·1) instead of W.
        gradient: ``"rloss"`` (its ``−2 W S``) or ``"exact"`` (the gradient of the value, see the module docstring).
        backend: lattice back end (``"auto"``, ``"torch"``, ``"numba"``).

    Returns:
        A 0-d tensor (an (N,) tensor for ``reduction="none"``), float32 (float64 for float64 segmentations).

    Raises:
        ValueError: shapes that disagree, a ROI not in {0, 1}, NaN or Inf, images outside 0..255, bad parameters.
        InputTypeError: tensors of the wrong kind.

    Shape:
        - images: (N, 3, H, W)
        - segmentations: (N, K, H, W)
        - rois: (N, H, W)
        - output: () or (N,)

    Example:
        >>> images = torch.rand(2, 3, 20, 24) * 255
        >>> probs = torch.softmax(torch.randn(2, 4, 20, 24), dim=1).requires_grad_()
        >>> loss = dense_crf_loss(images, probs, sigma_rgb=15.0, sigma_xy=10.0)
        >>> loss.backward()
        >>> loss.shape, probs.grad.shape
        (torch.Size([]), torch.Size([2, 4, 20, 24]))
    """
    check_tensor("segmentations", segmentations, layout="(N, K, H, W) probabilities", ndim=4, kind="floating")
    check_tensor("images", images, layout="(N, 3, H, W) colours in 0..255", ndim=4)
    n, _, h, w = segmentations.shape
    require(
        tuple(images.shape) == (n, 3, h, w),
        f"images must be (N, 3, H, W) = ({n}, 3, {h}, {w}) for segmentations {tuple(segmentations.shape)}, got "
        f"{tuple(images.shape)}",
    )
    if rois is not None:
        check_tensor("rois", rois, layout="(N, H, W) in {0, 1}", ndim=3)
        require(
            tuple(rois.shape) == (n, h, w),
            f"rois must be (N, H, W) = ({n}, {h}, {w}) for segmentations {tuple(segmentations.shape)}, got "
            f"{tuple(rois.shape)}",
        )
    sigma_rgb = check_positive("sigma_rgb", sigma_rgb)
    sigma_xy = check_positive("sigma_xy", sigma_xy)
    scale_factor = check_positive("scale_factor", scale_factor)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if gradient not in ("rloss", "exact"):
        raise ValueError(f"gradient must be 'rloss' or 'exact', got {gradient!r}")
    if not torch.compiler.is_compiling():
        _check_values(images, segmentations, rois)

    with precision(segmentations) as (dtype, out_dtype):
        device = segmentations.device
        image = images.to(device=device, dtype=dtype)
        probs = segmentations.to(dtype)
        roi = None if rois is None else rois.to(device=device, dtype=dtype)
        if scale_factor != 1.0:
            image = F.interpolate(image, scale_factor=scale_factor)  # nearest, as rloss
            probs = F.interpolate(probs, scale_factor=scale_factor, mode="bilinear", align_corners=False)
            roi = None if roi is None else F.interpolate(roi[:, None], scale_factor=scale_factor)[:, 0]
            sigma_xy = sigma_xy * scale_factor
        masked = probs if roi is None else probs * roi[:, None]
        features = guided_features(image.detach(), sigma_xy, sigma_rgb)  # (x/σ_xy, y/σ_xy, rgb/σ_rgb)
        lattice = PermutohedralLattice(features, backend=backend, pad_to=4)  # rloss's SSE lattice: phantom vertices
        root = None
        if normalized:  # (K·1)^-1/2 per pixel
            root = lattice.normalizer.sqrt().transpose(1, 2).reshape(n, 1, *masked.shape[2:])
        if gradient == "rloss":
            per_image = _RlossEnergy.apply(masked, lattice, root) * weight
        else:
            per_image = -_quadratic(masked, lattice, root) * weight
        result = per_image.mean() if reduction == "mean" else per_image.sum() if reduction == "sum" else per_image
        return result.to(out_dtype)


def _affinity(values: torch.Tensor, lattice: PermutohedralLattice, root: torch.Tensor | None) -> torch.Tensor:
    """``W values``, or ``D^-1/2 W D^-1/2 values`` with ``root`` = D^-1/2."""
    if root is None:
        return lattice.filter(values)
    return lattice.filter(values * root) * root


def _quadratic(masked: torch.Tensor, lattice: PermutohedralLattice, root: torch.Tensor | None) -> torch.Tensor:
    """``Σ_k S_kᵀ W S_k`` per image, differentiable through the lattice (the exact gradient ``(W + Wᵀ) S``)."""
    return (masked * _affinity(masked, lattice, root)).sum(dim=(1, 2, 3))


class _RlossEnergy(torch.autograd.Function):
    """``−Σ_k S_kᵀ W S_k`` per image, with rloss's gradient ``−2 W S`` (W taken as symmetric)."""

    @staticmethod
    def forward(ctx, masked, lattice, root):
        with torch.no_grad():
            affinity = _affinity(masked, lattice, root)
        ctx.save_for_backward(affinity)
        return -(masked * affinity).sum(dim=(1, 2, 3))

    @staticmethod
    def backward(ctx, grad):
        (affinity,) = ctx.saved_tensors
        return -2 * grad.view(-1, 1, 1, 1) * affinity, None, None


def _check_values(images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor | None) -> None:
    """The checks that read the data (one reduction each): finite values, colours in 0..255, a binary ROI."""
    check_finite("segmentations", segmentations)
    low, high = (float(v) for v in torch.aminmax(images.detach()))  # one pass: NaN and Inf show in the extremes
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"images {tuple(images.shape)} contains NaN or Inf")
    if low < 0 or high > 255:
        raise ValueError(
            f"images must hold colours in 0..255 (the unnormalised images, as rloss's denormalizeimage gives them), "
            f"got values in [{low:.4g}, {high:.4g}]: mean-subtracted or 0..1 images make the colour bandwidth "
            "meaningless"
        )
    if rois is not None and bool(((rois != 0) & (rois != 1)).any()):
        raise ValueError("rois must hold only 0 (outside) and 1 (inside)")


class DenseCRFLoss(nn.Module):
    """rloss's ``DenseCRFLoss``, the same constructor and call: ``DenseCRFLoss(weight, sigma_rgb, sigma_xy,
    scale_factor)(images, segmentations, rois)``; see :func:`dense_crf_loss`.

    Args:
        weight: the factor in front of the loss (the paper uses 2e-9 at its scale).
        sigma_rgb: colour bandwidth in 0..255 units (15 in the paper).
        sigma_xy: spatial bandwidth in pixels (100 in the paper).
        scale_factor: the scale the loss is computed at (0.5 in the paper).

    Shape:
        - images: (N, 3, H, W) colours in 0..255
        - segmentations: (N, K, H, W) probabilities
        - rois: (N, H, W) in {0, 1}
        - output: ()

    Example:
        >>> loss_fn = DenseCRFLoss(weight=2e-9, sigma_rgb=15.0, sigma_xy=100.0, scale_factor=0.5)
        >>> images = torch.rand(2, 3, 32, 40) * 255
        >>> probs = torch.softmax(torch.randn(2, 3, 32, 40), dim=1)
        >>> loss_fn(images, probs, torch.ones(2, 32, 40)).shape
        torch.Size([])
    """

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float) -> None:
        super().__init__()
        self.weight = float(weight)
        self.sigma_rgb = check_positive("sigma_rgb", sigma_rgb)
        self.sigma_xy = check_positive("sigma_xy", sigma_xy)
        self.scale_factor = check_positive("scale_factor", scale_factor)

    def forward(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return dense_crf_loss(
            images,
            segmentations,
            rois,
            sigma_rgb=self.sigma_rgb,
            sigma_xy=self.sigma_xy,
            scale_factor=self.scale_factor,
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, weight={self.weight}, "
            f"scale_factor={self.scale_factor}"
        )
