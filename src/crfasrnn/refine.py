"""Dense-CRF refinement of any segmentation: class probabilities or a rough label map, sharpened to the image's edges.

This is what DeepLab and pydensecrf users do with a fully connected CRF: no trained weights, only the unary (from a
network's probabilities or from an annotation) and the two Gaussian kernels of :mod:`crfasrnn.crf`. The CRF itself is
:func:`crfasrnn.crf.crf_rnn` with a Potts model; this module only builds the unary and checks the inputs.

Parameters and pydensecrf. A pydensecrf program

.. code-block:: python

    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(unary_from_labels(labels, C, gt_prob=0.7, zero_unsure=True))   # or unary_from_softmax(probs)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    Q = d.inference(5)

is ``refine(image, labels=..., num_iterations=5, theta_gamma=3, spatial_weight=3, theta_alpha=80, theta_beta=13,
bilateral_weight=10, gt_prob=0.7)``:

- ``theta_gamma`` is the Gaussian kernel's ``sxy``; ``spatial_weight`` is its ``compat``;
- ``theta_alpha`` and ``theta_beta`` are the bilateral kernel's ``sxy`` and ``srgb``; ``bilateral_weight`` its
  ``compat``;
- a scalar ``compat`` in pydensecrf is a ``PottsCompatibility(w)``, which adds ``+w · (K Q)_l`` to the score of label
  ``l`` (it subtracts ``-w · K Q`` from the negative energy). Here the layer computes ``Q = U − M (W_s S + W_b B)``
  with ``M = −I`` (the CRF-RNN convention) and ``W = w·I``, which adds the same ``+w · (K Q)_l``: the same Potts model.
  pydensecrf's unary is an *energy* (``−log p``); ours is a score (``log p``), so the signs of the two conventions
  cancel and the numbers carry over unchanged.

The features are densecrf's, ``(x/θγ, y/θγ)`` and ``(x/θα, y/θα, r/θβ, g/θβ, b/θβ)`` with colours in 0..255. One
difference remains: densecrf normalises its kernels symmetrically by default (``NORMALIZE_SYMMETRIC``), CRF-RNN per
pixel (``1 / (K·1)``). On the classic dense-CRF examples (Krähenbühl's program, as shipped with pydensecrf) the refined
labels agree with the original outputs on 99.6 % of the pixels (``tests/test_refine_cli.py``).
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .crf import crf_rnn
from .errors import InputTypeError
from .higher_order import Detections, HigherOrderPotentials, Superpixels, slic_superpixels

__all__ = [
    "check_parameters",
    "infer_num_classes",
    "label_changes",
    "refine",
    "unary_from_labels",
    "unary_from_probs",
]

logger = logging.getLogger(__name__)

#: Probabilities are clipped to this floor before the logarithm (pydensecrf's ``unary_from_softmax`` default).
PROB_CLIP = 1e-5
#: The largest class count inferred from a label map (a larger one must be given as ``num_classes``).
MAX_INFERRED_CLASSES = 1024
#: Tolerance on ``sum over classes == 1`` for probabilities given without ``normalize=True``.
SUM_TOLERANCE = 1e-3


def _check_gt_prob(gt_prob: float) -> float:
    if isinstance(gt_prob, bool) or not isinstance(gt_prob, numbers.Real) or not 0.0 < float(gt_prob) < 1.0:
        raise ValueError(f"gt_prob must be a number strictly between 0 and 1, got {gt_prob!r}")
    return float(gt_prob)


def _check_num_classes(num_classes: Any, minimum: int = 1) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < minimum:
        raise ValueError(f"num_classes must be an integer >= {minimum}, got {num_classes!r}")
    return int(num_classes)


def unary_from_labels(
    labels: torch.Tensor, num_classes: int, *, gt_prob: float = 0.7, unknown_label: int | None = None
) -> torch.Tensor:
    """Unary scores (log-probabilities) from a label map, as pydensecrf's ``unary_from_labels`` builds them.

    A labelled pixel gets probability ``gt_prob`` on its label and ``(1 − gt_prob) / (C − 1)`` on every other label; a
    pixel whose label is ``unknown_label`` gets the uniform ``1 / C``. The result is ``log p`` (pydensecrf's energy is
    ``−log p``).

    Args:
        labels: (..., H, W) integer labels in ``0..num_classes-1`` or ``unknown_label``.
        num_classes: number of classes C >= 2.
        gt_prob: confidence in the given labels, in (0, 1).
        unknown_label: the value marking pixels with no information, or ``None``.

    Returns:
        (..., C, H, W) float32 log-probabilities on the labels' device.

    Shape:
        - labels: (H, W) or (B, H, W)
        - output: (C, H, W) or (B, C, H, W)

    Example:
        >>> u = unary_from_labels(torch.tensor([[0, 1, 255]]), 3, gt_prob=0.6, unknown_label=255)
        >>> u.exp()[:, 0, :]
        tensor([[0.6000, 0.2000, 0.3333],
                [0.2000, 0.6000, 0.3333],
                [0.2000, 0.2000, 0.3333]])
    """
    num_classes = _check_num_classes(num_classes, 2)
    gt_prob = _check_gt_prob(gt_prob)
    labels = _check_labels(labels, num_classes, unknown_label)
    known = labels != unknown_label if unknown_label is not None else torch.ones_like(labels, dtype=torch.bool)
    class_axis = labels.ndim - 2
    shape = labels.shape[:class_axis] + (num_classes,) + labels.shape[class_axis:]
    unary = torch.full(shape, math.log((1.0 - gt_prob) / (num_classes - 1)), dtype=torch.float32, device=labels.device)
    index = torch.where(known, labels, 0).unsqueeze(class_axis)
    unary.scatter_(class_axis, index, math.log(gt_prob))
    return torch.where(known.unsqueeze(class_axis), unary, math.log(1.0 / num_classes))


def _check_labels(labels: Any, num_classes: int, unknown_label: int | None) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise InputTypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputTypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {tuple(labels.shape)})")
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be (H, W) or (B, H, W), got shape {tuple(labels.shape)}")
    labels = labels.long()
    known = labels[labels != unknown_label] if unknown_label is not None else labels.reshape(-1)
    if known.numel():
        low, high = int(known.min()), int(known.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            extra = "" if unknown_label is None else f" or the unknown label {unknown_label}"
            raise ValueError(f"label value {bad} is outside 0..{num_classes - 1} for {num_classes} classes{extra}")
    return labels


def unary_from_probs(
    probs: torch.Tensor, size: tuple[int, int] | None = None, *, normalize: bool = False, clip: float = PROB_CLIP
) -> torch.Tensor:
    """Unary scores ``log p`` from class probabilities, upsampled (bilinearly) to ``size`` if they are smaller.

    Args:
        probs: (C, H', W') or (B, C, H', W') probabilities: finite, >= 0 and summing to 1 over the class axis (within
            1e-3), unless ``normalize`` is set, in which case each pixel is divided by its sum (which must be > 0).
        size: the image's (H, W); ``None`` keeps the probabilities' size. H'/W' must not exceed it and must have its
            aspect ratio (to within a pixel).
        normalize: rescale every pixel's probabilities to sum to 1 instead of rejecting them.
        clip: floor applied before the logarithm (pydensecrf's ``unary_from_softmax`` uses 1e-5).

    Returns:
        (..., C, H, W) float32 log-probabilities.

    Example:
        >>> p = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]]])  # (C=2, H=1, W=2)
        >>> unary_from_probs(p).exp()
        tensor([[[0.9000, 0.2000]],
        <BLANKLINE>
                [[0.1000, 0.8000]]])
    """
    if not isinstance(probs, torch.Tensor):
        raise InputTypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise InputTypeError(f"probs must be floating point, got dtype {probs.dtype} (shape {tuple(probs.shape)})")
    if probs.ndim not in (3, 4):
        raise ValueError(f"probs must be (C, H, W) or (B, C, H, W), got shape {tuple(probs.shape)}")
    if probs.numel() == 0:
        raise ValueError(f"probs must not be empty, got shape {tuple(probs.shape)}")
    probs = probs.float()
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"probs {tuple(probs.shape)} contain NaN or Inf")
    if bool((probs < 0).any()):
        raise ValueError(f"probs {tuple(probs.shape)} contain negative values (minimum {float(probs.min()):.4g})")
    class_axis = probs.ndim - 3
    sums = probs.sum(dim=class_axis, keepdim=True)
    if normalize:
        if bool((sums <= 0).any()):
            raise ValueError(f"probs {tuple(probs.shape)} have pixels whose probabilities are all 0: cannot normalise")
        probs = probs / sums
    else:
        worst = float((sums - 1).abs().max())
        if worst > SUM_TOLERANCE:
            raise ValueError(
                f"probs {tuple(probs.shape)} do not sum to 1 over the class axis (off by up to {worst:.3g}); "
                "pass normalize=True (--normalize) to rescale them"
            )
    if size is not None and tuple(probs.shape[-2:]) != tuple(size):
        probs = _upsample(probs, (int(size[0]), int(size[1])))
    return probs.clamp_min(clip).log()


def _upsample(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = probs.shape[-2:]
    height, width = size
    if h > height or w > width or (abs(h - height * w / width) > 1.0 and abs(w - width * h / height) > 1.0):
        raise ValueError(
            f"probs of size {h}x{w} (HxW) do not match the image's {height}x{width}: they must have its size, "
            "or a lower resolution with its aspect ratio"
        )
    batched = probs.ndim == 4
    out = F.interpolate(probs if batched else probs[None], size=size, mode="bilinear", align_corners=False)
    return out if batched else out[0]


def check_parameters(
    *,
    num_iterations: int = 10,
    theta_alpha: float = 80.0,
    theta_beta: float = 13.0,
    theta_gamma: float = 3.0,
    spatial_weight: float = 3.0,
    bilateral_weight: float = 10.0,
    gt_prob: float = 0.7,
    num_classes: int | None = None,
    superpixel_weight: float = 0.5,
    detection_weight: float = 4.0,
) -> None:
    """Check :func:`refine`'s parameters without data (for callers that want to fail before reading any input).

    Raises:
        ValueError: the first parameter out of range, named.
    """
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, numbers.Integral) or num_iterations < 0:
        raise ValueError(f"num_iterations must be an integer >= 0, got {num_iterations!r}")
    for name, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    weights = (
        ("spatial_weight", spatial_weight),
        ("bilateral_weight", bilateral_weight),
        ("superpixel_weight", superpixel_weight),
        ("detection_weight", detection_weight),
    )
    for name, value in weights:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    _check_gt_prob(gt_prob)
    if num_classes is not None:
        _check_num_classes(num_classes)


def _image_batch(image: Any) -> torch.Tensor:
    """Image(s) as a (B, H, W, 3) uint8 tensor: a PIL image, an (H, W, 3) / (B, H, W, 3) array or tensor, or a list."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image list is empty")
        frames = [_image_batch(im) for im in image]
        if any(f.shape[1:] != frames[0].shape[1:] for f in frames):
            raise ValueError(f"images of a batch must share one size, got {[tuple(f.shape[1:3]) for f in frames]}")
        return torch.cat(frames)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputTypeError(f"image must be uint8 RGB (0..255), got dtype {image.dtype} (shape {image.shape})")
        image = torch.from_numpy(_writable(image))
    if not isinstance(image, torch.Tensor):
        raise InputTypeError(f"image must be a PIL image, a numpy array or a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise InputTypeError(f"image must be uint8 RGB (0..255), got dtype {image.dtype} (shape {tuple(image.shape)})")
    if image.ndim not in (3, 4) or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"image must be (H, W, 3) or (B, H, W, 3) RGB, got shape {tuple(image.shape)}")
    return image if image.ndim == 4 else image[None]


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable view or copy (torch.from_numpy warns about read-only arrays, e.g. from PIL)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise InputTypeError(f"{name} must be a numeric array, got dtype object")
        return torch.from_numpy(_writable(value))
    raise InputTypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")


def refine(
    image: Any,
    probs: Any = None,
    labels: Any = None,
    *,
    num_classes: int | None = None,
    num_iterations: int = 10,
    theta_alpha: float = 80.0,
    theta_beta: float = 13.0,
    theta_gamma: float = 3.0,
    spatial_weight: float = 3.0,
    bilateral_weight: float = 10.0,
    gt_prob: float = 0.7,
    unknown_label: int | None = None,
    normalize: bool = False,
    return_probs: bool = False,
    device: str | torch.device | None = None,
    backend: str = "auto",
    superpixels: Superpixels | int | tuple[int, ...] | list[int] | None = None,
    superpixel_weight: float = 0.5,
    detections: Detections | None = None,
    detection_weight: float = 4.0,
):
    """Refine class probabilities or a rough label map with a fully connected CRF (mean field, Potts model).

    Give exactly one of ``probs`` and ``labels``. The unary is ``log p`` of the probabilities (upsampled bilinearly if
    they are at a lower resolution), or pydensecrf's unary-from-labels: ``gt_prob`` on a pixel's label,
    ``(1 − gt_prob) / (C − 1)`` on the others, uniform where the label is ``unknown_label``. The defaults are the
    classic dense-CRF example's kernels (see the module docstring for the mapping to pydensecrf's ``sxy``, ``srgb``
    and ``compat``); the CRF is :func:`crfasrnn.crf.crf_rnn` with ``W_s = spatial_weight·I``,
    ``W_b = bilateral_weight·I`` and compatibility ``−I``.

    Args:
        image: the photo: a PIL image, an (H, W, 3) uint8 RGB array or tensor, a (B, H, W, 3) batch, or a list of
            images of one size.
        probs: (C, h, w) or (B, C, h, w) class probabilities (numpy or torch); h, w at most H, W with the image's
            aspect ratio.
        labels: (H, W) or (B, H, W) integer label map (numpy or torch) in ``0..C-1``, plus ``unknown_label``.
        num_classes: C for ``labels`` (default: largest known label + 1); must equal the class axis of ``probs``.
        num_iterations: mean-field iterations.
        theta_alpha: positional bandwidth of the bilateral kernel in pixels (pydensecrf's bilateral ``sxy``).
        theta_beta: colour bandwidth of the bilateral kernel in 0..255 units (pydensecrf's ``srgb``).
        theta_gamma: bandwidth of the spatial kernel in pixels (pydensecrf's Gaussian ``sxy``).
        spatial_weight: Potts weight of the spatial kernel (pydensecrf's Gaussian ``compat``).
        bilateral_weight: Potts weight of the bilateral kernel (pydensecrf's bilateral ``compat``).
        gt_prob: confidence in ``labels``, in (0, 1).
        unknown_label: the label value of pixels with no information (e.g. 255), or ``None``.
        normalize: rescale ``probs`` to sum to 1 per pixel instead of rejecting those that do not.
        return_probs: also return the refined marginals.
        device: where to compute (default: the image's device if it is a tensor, else CPU).
        backend: lattice back end (``"auto"``, ``"torch"``, ``"numba"``).
        superpixels: add the superpixel potential of Arnab et al. (:mod:`crfasrnn.higher_order`, caffe-tvg's form:
            the unary's mean over each segment): SLIC superpixel counts, one per scale (e.g. ``(100, 200, 400)``,
            the ``superpixels`` extra), or :class:`~crfasrnn.higher_order.Superpixels` of the batch.
        superpixel_weight: the weight of each superpixel scale.
        detections: add the detection potential: :class:`~crfasrnn.higher_order.Detections` of the batch (e.g. from
            :func:`~crfasrnn.higher_order.read_detections`).
        detection_weight: its weight w_x for every class (w_y is 1).

    Returns:
        The refined labels, (H, W) or (B, H, W) int64 — a torch tensor if the image, probs or labels were tensors,
        else a numpy array — and with ``return_probs`` a tuple ``(labels, probs)`` with probs (C, H, W) or
        (B, C, H, W) float32.

    Raises:
        ValueError: mismatched sizes, probabilities that are negative, NaN or do not sum to 1, labels beyond the class
            count, bad parameters.
        TypeError: inputs of the wrong kind or dtype.

    Shape:
        - image: (H, W, 3) or (B, H, W, 3) uint8
        - probs: (C, h, w) or (B, C, h, w); labels: (H, W) or (B, H, W)
        - output: (H, W) or (B, H, W)

    Example:
        >>> image = np.zeros((24, 32, 3), np.uint8); image[:, 16:] = 200        # two flat halves
        >>> coarse = np.zeros((24, 32), np.int64); coarse[:, 12:] = 1           # a boundary 4 pixels off
        >>> coarse[:, 10:20] = 255                                              # and a band of unknown around it
        >>> refined = refine(image, labels=coarse, unknown_label=255)
        >>> bool((refined == (np.arange(32) >= 16)).all())
        True
    """
    if (probs is None) == (labels is None):
        raise ValueError("give exactly one of probs and labels")
    check_parameters(
        num_iterations=num_iterations,
        theta_alpha=theta_alpha,
        theta_beta=theta_beta,
        theta_gamma=theta_gamma,
        spatial_weight=spatial_weight,
        bilateral_weight=bilateral_weight,
        gt_prob=gt_prob,
        num_classes=num_classes,
        superpixel_weight=superpixel_weight,
        detection_weight=detection_weight,
    )
    as_torch = any(isinstance(x, torch.Tensor) for x in (image, probs, labels))
    frames = _image_batch(image)
    batch, height, width, _ = frames.shape
    if device is None:
        device = frames.device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this torch has no CUDA device available")

    if probs is not None:
        probs = _as_tensor("probs", probs)
        single = probs.ndim == 3
        unary = unary_from_probs(probs.to(device), (height, width), normalize=normalize)
        if num_classes is not None and _check_num_classes(num_classes) != unary.shape[-3]:
            raise ValueError(
                f"num_classes={num_classes} but probs have {unary.shape[-3]} classes (shape {tuple(probs.shape)})"
            )
    else:
        labels = _as_tensor("labels", labels)
        if labels.ndim in (2, 3) and tuple(labels.shape[-2:]) != (height, width):
            raise ValueError(
                f"labels of size {labels.shape[-2]}x{labels.shape[-1]} (HxW) do not match the image's {height}x{width}"
            )
        single = labels.ndim == 2
        if num_classes is None:
            num_classes = infer_num_classes(labels, unknown_label)
        unary = unary_from_labels(labels.to(device), num_classes, gt_prob=gt_prob, unknown_label=unknown_label)
    if single:
        unary = unary[None]
    if unary.shape[0] != batch:
        raise ValueError(f"{unary.shape[0]} unary map(s) for {batch} image(s): the batch sizes must agree")

    num_classes = unary.shape[1]
    colours = frames.to(device).permute(0, 3, 1, 2).float()
    eye = torch.eye(num_classes, device=device)
    higher_order, segments = _higher_order(
        frames, num_classes, superpixels, superpixel_weight, detections, detection_weight, num_iterations
    )
    if higher_order is not None:
        higher_order.to(device)
        segments = None if segments is None else segments.to(device)
        detections = None if detections is None else detections.to(device)
    logger.debug("refining %d image(s) of %dx%d with %d classes", batch, width, height, num_classes)
    with torch.no_grad():
        scores = crf_rnn(
            unary,
            colours,
            spatial_weight * eye,
            bilateral_weight * eye,
            -eye,
            num_iterations=int(num_iterations),
            theta_alpha=theta_alpha,
            theta_beta=theta_beta,
            theta_gamma=theta_gamma,
            backend=backend,
            higher_order=higher_order,
            detections=detections,
            superpixels=segments,
        )
    out_labels = scores.argmax(dim=1)
    out_probs = scores.softmax(dim=1) if return_probs else None
    image_batched = isinstance(image, (list, tuple)) or getattr(image, "ndim", 3) == 4
    if single and not image_batched:
        out_labels = out_labels[0]
        out_probs = None if out_probs is None else out_probs[0]
    if not as_torch:
        labels_array = out_labels.cpu().numpy()
        probs_array = None if out_probs is None else out_probs.cpu().numpy()
        return (labels_array, probs_array) if return_probs else labels_array
    return (out_labels, out_probs) if return_probs else out_labels


def _higher_order(
    frames, num_classes, superpixels, superpixel_weight, detections, detection_weight, num_iterations
) -> tuple[HigherOrderPotentials | None, Superpixels | None]:
    """The higher-order potentials' weights and the superpixels (SLIC made here from counts), or (None, None)."""
    if superpixels is None and detections is None:
        return None, None
    if detections is not None and not isinstance(detections, Detections):
        raise InputTypeError(f"detections must be crfasrnn.higher_order.Detections, got {type(detections).__name__}")
    if superpixels is not None and not isinstance(superpixels, Superpixels):
        counts = [superpixels] if isinstance(superpixels, numbers.Integral) else list(superpixels)
        if not counts or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in counts):
            raise ValueError(f"superpixels must be SLIC segment counts >= 1 (one per scale), got {superpixels!r}")
        # the counts are checked, but SLIC runs only where the CRF does (not for a check with 0 iterations)
        superpixels = slic_superpixels(frames.cpu(), [int(n) for n in counts]) if num_iterations else None
        scales = len(counts)
    else:
        scales = 0 if superpixels is None else superpixels.num_scales
    potentials = HigherOrderPotentials(
        num_classes,
        detections=detections is not None,
        superpixel_scales=scales,
        detection_x_weight=float(detection_weight),
        detection_y_weight=1.0,
        superpixel_weight=float(superpixel_weight),
    )
    return potentials, superpixels


def infer_num_classes(labels: torch.Tensor, unknown_label: int | None) -> int:
    """The class count a label map implies: its largest known label + 1 (at least 2).

    Example:
        >>> infer_num_classes(torch.tensor([[0, 3], [255, 1]]), unknown_label=255)
        4
    """
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputTypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {tuple(labels.shape)})")
    known = labels[labels != unknown_label] if unknown_label is not None else labels.reshape(-1)
    if known.numel() == 0:
        raise ValueError("labels hold no known pixel: give num_classes, or a map with at least one labelled pixel")
    if int(known.min()) < 0:
        raise ValueError(f"label value {int(known.min())} is negative")
    num_classes = max(int(known.max()) + 1, 2)
    if num_classes > MAX_INFERRED_CLASSES:
        raise ValueError(
            f"the largest label {num_classes - 1} would make {num_classes} classes; pass num_classes if that is meant "
            "(or unknown_label if it marks unlabelled pixels)"
        )
    return num_classes


def label_changes(coarse: np.ndarray, refined: np.ndarray, unknown_label: int | None) -> tuple[int, int, int]:
    """What a refinement did to a label map: ``(changed, labelled, unknown)`` pixel counts.

    ``changed`` counts the labelled pixels of ``coarse`` whose label the refinement changed, ``labelled`` the
    labelled pixels, ``unknown`` the pixels of ``unknown_label`` (all of which the refinement labels); without an
    unknown label, negative values are unknown.

    Example:
        >>> label_changes(np.array([[0, 1], [255, 1]]), np.array([[0, 0], [1, 1]]), 255)
        (1, 3, 1)
    """
    known = coarse != unknown_label if unknown_label is not None else coarse >= 0
    return int((refined[known] != coarse[known]).sum()), int(known.sum()), int((~known).sum())
