"""Pre- and postprocessing of the published CRF-RNN model (docs/reference.md §5): resize, mean subtraction + BGR,
padding, argmax.

Images as arrays are (H, W, 3) uint8 RGB; the network's input is the (3, H, W) float32 tensor the reference demos
prepare: the RGB mean subtracted, then the channels flipped to BGR, zero-padded at the bottom and right.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ._checks import check_count
from .errors import InputTypeError

__all__ = [
    "VOC_CLASSES",
    "VOC_MEAN_RGB",
    "NETWORK_SIZE",
    "Prepared",
    "check_rgb_image",
    "resize_longest_side",
    "preprocess",
    "pad_to",
    "prepare",
    "labels_from_logits",
    "postprocess",
]

#: The 21 PASCAL VOC classes in label order (0 = background).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: The ImageNet RGB mean of the VGG-16 backbone, subtracted before the flip to BGR (PT ``util.py:58``).
VOC_MEAN_RGB: tuple[float, float, float] = (123.68, 116.779, 103.939)

#: The input size of the published model's deploy network (500×500); images are resized and padded to it.
NETWORK_SIZE = 500


def check_rgb_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check that ``image`` is an (H, W, 3) uint8 RGB array and return it as a numpy array.

    Raises:
        TypeError: not an array or not uint8.
        ValueError: wrong shape or empty.
    """
    if isinstance(image, torch.Tensor) or not isinstance(image, np.ndarray):
        raise InputTypeError(f"{name} must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise InputTypeError(f"{name} must be uint8 (0..255), got dtype {image.dtype} (shape {image.shape})")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {image.shape}")
    return image


def resize_longest_side(image: np.ndarray, max_size: int = NETWORK_SIZE, *, upscale: bool = False) -> np.ndarray:
    """Resize (bilinear) so that the longer side is ``max_size``, keeping the aspect ratio.

    Images already within ``max_size`` are returned unchanged unless ``upscale`` is true (the PyTorch port always
    upscales; the Caffe demo never does). Sizes are rounded down as the references do (``int(w * ratio)``), at least 1.

    Example:
        >>> resize_longest_side(np.zeros((300, 1000, 3), np.uint8)).shape
        (150, 500, 3)
        >>> resize_longest_side(np.zeros((30, 40, 3), np.uint8)).shape
        (30, 40, 3)
        >>> resize_longest_side(np.zeros((30, 40, 3), np.uint8), upscale=True).shape
        (375, 500, 3)
    """
    image = check_rgb_image(image)
    check_count("max_size", max_size, minimum=1)
    h, w = image.shape[:2]
    if max(h, w) == max_size or (max(h, w) < max_size and not upscale):
        return image
    ratio = min(max_size / w, max_size / h)
    size = (max(1, int(w * ratio)), max(1, int(h * ratio)))
    # Pillow sets its filter constants with setattr(): its annotations lack them
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))  # type: ignore[attr-defined]


def preprocess(image: np.ndarray, *, mean_rgb=VOC_MEAN_RGB) -> torch.Tensor:
    """(H, W, 3) uint8 RGB to the network's (3, H, W) float32 input: ``image - mean_rgb``, then channels to BGR.

    Example:
        >>> x = preprocess(np.full((2, 2, 3), (200, 100, 50), np.uint8))
        >>> x[:, 0, 0]
        tensor([-53.9390, -16.7790,  76.3200])
    """
    image = check_rgb_image(image)
    mean = np.asarray(mean_rgb, dtype=np.float32)
    if mean.shape != (3,):
        raise ValueError(f"mean_rgb must have 3 values (R, G, B), got {mean_rgb!r}")
    bgr = (image.astype(np.float32) - mean)[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))


def pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad a (..., H, W) tensor at the bottom and right to at least ``height`` × ``width`` (never crops).

    Example:
        >>> pad_to(torch.ones(3, 2, 2), 3, 4)[0]
        tensor([[1., 1., 0., 0.],
                [1., 1., 0., 0.],
                [0., 0., 0., 0.]])
    """
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, max(0, width - w), 0, max(0, height - h)))


class Prepared(NamedTuple):
    """The network input of one photo and the sizes needed to map its labels back."""

    tensor: torch.Tensor  #: (3, H_pad, W_pad) float32 network input
    resized_size: tuple[int, int]  #: (h, w) of the resized photo inside the padded tensor
    original_size: tuple[int, int]  #: (H, W) of the photo as given


def prepare(
    image: np.ndarray,
    *,
    max_size: int = NETWORK_SIZE,
    upscale: bool = False,
    pad: bool = True,
    mean_rgb=VOC_MEAN_RGB,
) -> Prepared:
    """Resize, preprocess and (optionally) zero-pad to ``max_size`` × ``max_size``: the reference demo's input.

    Example:
        >>> p = prepare(np.zeros((100, 60, 3), np.uint8), max_size=50)
        >>> tuple(p.tensor.shape), p.resized_size, p.original_size
        ((3, 50, 50), (50, 30), (100, 60))
    """
    image = check_rgb_image(image)
    resized = resize_longest_side(image, max_size, upscale=upscale)
    x = preprocess(resized, mean_rgb=mean_rgb)
    if pad:
        x = pad_to(x, max_size, max_size)
    return Prepared(x, tuple(resized.shape[:2]), tuple(image.shape[:2]))


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the class axis: (C, H, W) or (B, C, H, W) logits to (H, W) / (B, H, W) int64 labels."""
    if logits.ndim not in (3, 4):
        raise ValueError(f"logits must be (C, H, W) or (B, C, H, W), got shape {tuple(logits.shape)}")
    return logits.argmax(dim=-3)


def postprocess(logits: torch.Tensor, resized_size, original_size) -> np.ndarray:
    """(C, H_pad, W_pad) logits to an (H, W) uint8 label map of the original photo.

    Argmax, crop the padding away (to ``resized_size``), then nearest-neighbour resize to ``original_size``.

    Example:
        >>> logits = torch.zeros(3, 4, 4); logits[2, :2, :2] = 1
        >>> postprocess(logits, (2, 2), (4, 4))
        array([[2, 2, 2, 2],
               [2, 2, 2, 2],
               [2, 2, 2, 2],
               [2, 2, 2, 2]], dtype=uint8)
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (C, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[0] > 256:
        raise ValueError(f"at most 256 classes fit a uint8 label map, got {logits.shape[0]}")
    h, w = int(resized_size[0]), int(resized_size[1])
    if h > logits.shape[1] or w > logits.shape[2]:
        raise ValueError(f"resized_size {resized_size} exceeds the logits' size {tuple(logits.shape[1:])}")
    labels = labels_from_logits(logits)[:h, :w].to(torch.uint8).cpu().numpy()
    height, width = int(original_size[0]), int(original_size[1])
    if (height, width) != (h, w):
        # Pillow sets its filter constants with setattr(): its annotations lack them
        labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))  # type: ignore[attr-defined]
    return labels
