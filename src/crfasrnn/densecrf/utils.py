"""pydensecrf's helpers (``pydensecrf.utils``): unary energies from labels or probabilities, and kernel features.

They build numpy arrays for :class:`crfasrnn.densecrf.DenseCRF` exactly as pydensecrf's do (float32, points in C
order), so programs that mix them with the drop-in give the same numbers.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "compute_unary",
    "create_pairwise_bilateral",
    "create_pairwise_gaussian",
    "softmax_to_unary",
    "unary_from_labels",
    "unary_from_softmax",
]


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Unary energies from a label map, trusting each label with probability ``gt_prob``.

    A labelled point gets ``−log gt_prob`` for its label and ``−log((1 − gt_prob) / (n_labels − 1))`` for the others.
    With ``zero_unsure`` the value 0 means "unknown" (uniform energy ``−log(1 / n_labels)``) and the labels are
    1 … n_labels (label ``l`` is row ``l − 1``); otherwise they are 0 … n_labels − 1.

    Args:
        labels: integer label map of any shape (flattened in C order).
        n_labels: number of labels (not counting 0 where ``zero_unsure``).
        gt_prob: confidence in the annotation, strictly between 0 and 1.
        zero_unsure: whether 0 means "unknown".

    Returns:
        (n_labels, labels.size) float32 energies.

    Example:
        >>> unary_from_labels(np.array([0, 1, 2]), 2, 0.9).round(3)
        array([[0.693, 0.105, 2.303],
               [0.693, 2.303, 0.105]], dtype=float32)
    """
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob!r}")
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    rows = labels - 1 if zero_unsure else labels
    known = labels != 0 if zero_unsure else np.ones(labels.shape, bool)
    if known.any() and (rows[known].min() < 0 or rows[known].max() >= n_labels):
        low, high = (1, n_labels) if zero_unsure else (0, n_labels - 1)
        raise ValueError(
            f"labels must lie in {low}..{high} (0: unknown)" if zero_unsure else f"labels must lie in {low}..{high}"
        )
    energies = np.full((n_labels, labels.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    columns = np.flatnonzero(known)
    energies[rows[known], columns] = -np.log(gt_prob)
    if zero_unsure:
        energies[:, ~known] = -np.log(1.0 / n_labels)
    return energies


def unary_from_softmax(sm, scale: float | None = None, clip: float | None = 1e-5) -> np.ndarray:
    """Unary energies ``−log p`` from class probabilities (classes first; the rest is flattened).

    Args:
        sm: (n_classes, ...) probabilities.
        scale: where given (in (0, 1]), the probabilities are blended with the uniform distribution:
            ``scale · p + (1 − scale) / n_classes``.
        clip: lower bound on the probabilities before the logarithm (None: none).

    Returns:
        (n_classes, points) float32 energies.

    Example:
        >>> unary_from_softmax(np.array([[0.5, 0.9], [0.5, 0.0]])).round(2)
        array([[ 0.69,  0.11],
               [ 0.69, 11.51]], dtype=float32)
    """
    sm = np.asarray(sm)
    classes = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / classes)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([classes, -1]).astype(np.float32)


def _positions(shape: Sequence[int], sdims) -> np.ndarray:
    """The points' coordinates in array-axis order (``indexing='ij'``), each axis divided by its ``sdims``."""
    mesh = np.array(np.meshgrid(*[range(s) for s in shape], indexing="ij"), dtype=np.float32)
    for axis, s in enumerate(sdims):
        mesh[axis] /= s
    return mesh


def create_pairwise_gaussian(sdims: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Features of a Gaussian kernel over positions, for any number of dimensions.

    The features are the coordinates in array-axis order (row first for an image, unlike ``addPairwiseGaussian``'s
    ``(x, y)``), each divided by its entry of ``sdims``.

    Args:
        sdims: the bandwidth along each axis.
        shape: the CRF's shape.

    Returns:
        (len(sdims), prod(shape)) float32 features for ``addPairwiseEnergy``.

    Example:
        >>> create_pairwise_gaussian((1, 2), (2, 2))
        array([[0. , 0. , 1. , 1. ],
               [0. , 0.5, 0. , 0.5]], dtype=float32)
    """
    return _positions(shape, sdims).reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims: Sequence[float], schan, img, chdim: int = -1) -> np.ndarray:
    """Features of a bilateral kernel (positions and channels), for any number of dimensions and channels.

    Args:
        sdims: the positional bandwidth along each spatial axis.
        schan: the channel bandwidth: one number, or one per channel.
        img: the image or volume; its channels along ``chdim``.
        chdim: the axis of ``img`` that holds the channels, or -1 for an image without a channel axis (one channel).
            Note: -1 does *not* mean the last axis.

    Returns:
        (len(sdims) + channels, points) float32 features: the positions, then the channels.

    Example:
        >>> create_pairwise_bilateral((1, 1), 10, np.array([[0, 10], [20, 30]]))
        array([[0., 0., 1., 1.],
               [0., 1., 0., 1.],
               [0., 1., 2., 3.]], dtype=float32)
    """
    img = np.asarray(img)
    channels = (img[np.newaxis] if chdim == -1 else np.moveaxis(img, chdim, 0)).astype(np.float32)
    if isinstance(schan, numbers.Real):
        channels /= schan
    else:
        for i, s in enumerate(schan):
            channels[i] /= s
    mesh = _positions(channels.shape[1:], sdims)
    features = np.concatenate([mesh, channels])
    return features.reshape([features.shape[0], -1])


def compute_unary(labels, M: int, GT_PROB: float = 0.5) -> np.ndarray:
    """Deprecated: :func:`unary_from_labels`."""
    warnings.warn("compute_unary is deprecated, use unary_from_labels instead", DeprecationWarning, stacklevel=2)
    return unary_from_labels(labels, M, GT_PROB)


def softmax_to_unary(sm, GT_PROB: float = 1) -> np.ndarray:
    """Deprecated: :func:`unary_from_softmax` (``GT_PROB`` is its ``scale``, and nothing is clipped)."""
    warnings.warn("softmax_to_unary is deprecated, use unary_from_softmax instead", DeprecationWarning, stacklevel=2)
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)
