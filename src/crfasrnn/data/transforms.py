"""Training and evaluation transforms on (image (H, W, 3) uint8, label (H, W) int64) pairs.

Both take a NumPy random generator as third argument (the dataset makes it from seed, epoch and index), so that a
sample never depends on which worker or process loads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..transforms import VOC_MEAN_RGB
from .datasets import IGNORE_INDEX

__all__ = ["TrainTransform", "EvalTransform", "MEAN_FILL_RGB", "preprocess_batch"]

MEAN_FILL_RGB = tuple(round(c) for c in VOC_MEAN_RGB)
"""The ImageNet / VOC mean colour (rounded) that pads images: after mean subtraction the padding is ~0, as in the
reference demo's zero padding."""


def preprocess_batch(images: torch.Tensor, *, mean_rgb=VOC_MEAN_RGB) -> torch.Tensor:
    """A batch of uint8 RGB images to the network's input: float32, ``image - mean_rgb``, channels in BGR order.

    The batch form of :func:`crfasrnn.transforms.preprocess`, run on the images' device.

    Shape:
        - images: (B, 3, H, W) uint8 RGB.
        - output: (B, 3, H, W) float32 mean-subtracted BGR.

    Example:
        >>> preprocess_batch(torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1)).flatten()
        tensor([-53.9390, -16.7790,  76.3200])
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a (B, 3, H, W) uint8 RGB batch, got {tuple(images.shape)} {images.dtype}")
    mean = torch.tensor(mean_rgb, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean).flip(1).contiguous()


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return h, w


def _resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 or bool (H, W) array resized to PIL ``size`` (width, height), nearest neighbour."""
    return np.asarray(Image.fromarray(array).resize(size, Image.NEAREST))  # type: ignore[attr-defined]


def _empty(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.zeros((0, size[1], size[0]), dtype=masks.dtype)


class TrainTransform:
    """Random scale, random crop (padding the image with the mean colour and the label with 255), random flip.

    Args:
        crop_size: output (height, width), or one int for a square.
        scale_range: the scale factor is drawn uniformly from this range (``(1, 1)`` turns scaling off).
        hflip: flip horizontally with probability 1/2.
        fill: RGB colour of padded image pixels.
        pad_label: label of padded pixels (255, "unlabelled", by default; another value tells them apart from the
            image's unlabelled pixels, as the dense-CRF loss's region of interest needs).

    Example:
        >>> t = TrainTransform(8, scale_range=(1.0, 1.0), hflip=False)
        >>> image, label = np.zeros((5, 6, 3), np.uint8), np.ones((5, 6), np.int64)
        >>> out_image, out_label = t(image, label, np.random.default_rng(0))
        >>> out_image.shape, out_label.shape, int((out_label == 255).sum()), int((out_label == 1).sum())
        ((8, 8, 3), (8, 8), 34, 30)
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        *,
        scale_range: Sequence[float] = (0.5, 1.5),
        hflip: bool = True,
        fill: Sequence[int] = MEAN_FILL_RGB,
        pad_label: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        self.pad_label = int(pad_label)
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {tuple(scale_range)}")
        self.scale_range = (lo, hi)
        self.hflip = bool(hflip)
        self.fill = tuple(int(c) for c in fill)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, label, _ = self.with_masks(image, label, None, rng)
        return image, label

    def with_masks(
        self, image: np.ndarray, label: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The transform of the pair and of ``masks`` (a (D, H, W) bool stack of the image's pixels, e.g. the
        foregrounds of its detections), which follow the label map: resized nearest, padded with ``False``, cropped
        and flipped alike. The random draws are those of ``__call__``, so the pair is the same with or without
        masks."""
        lo, hi = self.scale_range
        scale = float(rng.uniform(lo, hi)) if hi > lo else lo
        if scale != 1.0:
            h, w = label.shape
            size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL sizes are (width, height)
            # Pillow sets its filter constants with setattr(): its annotations lack them
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))  # type: ignore[attr-defined]
            label = _resize_nearest(label.astype(np.uint8), size).astype(np.int64)
            if masks is not None:
                masks = np.stack([_resize_nearest(m, size) for m in masks]) if len(masks) else _empty(masks, size)
        ch, cw = self.crop_size
        h, w = label.shape
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            padded = np.empty((h + ph, w + pw, 3), np.uint8)
            padded[:] = np.asarray(self.fill, np.uint8)
            padded[:h, :w] = image
            padded_label = np.full((h + ph, w + pw), self.pad_label, np.int64)
            padded_label[:h, :w] = label
            image, label = padded, padded_label
            if masks is not None:
                masks = np.pad(masks, ((0, 0), (0, ph), (0, pw)), constant_values=False)
            h, w = label.shape
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        image = image[top : top + ch, left : left + cw]
        label = label[top : top + ch, left : left + cw]
        if masks is not None:
            masks = masks[:, top : top + ch, left : left + cw]
        if self.hflip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
            if masks is not None:
                masks = masks[:, :, ::-1]
        return (
            np.ascontiguousarray(image),
            np.ascontiguousarray(label),
            None if masks is None else np.ascontiguousarray(masks),
        )

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, hflip={self.hflip})"


class EvalTransform:
    """Evaluation keeps images at full size: the pair passes through unchanged (the class exists for symmetry)."""

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return image, label

    def with_masks(
        self, image: np.ndarray, label: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return image, label, masks

    def __repr__(self) -> str:
        return "EvalTransform()"
