"""The inputs of the higher-order potentials, batched and padded: :class:`Detections` and :class:`Superpixels`.

A batch of B images has a variable number of detections each; :class:`Detections` holds them padded to the largest
count D, the padding rows having a zero score and an empty mask (they then contribute nothing: every term of the
detection potential is scaled by the score or summed over the mask). A superpixel segmentation is a label map; several
scales are stacked, and every map is renumbered ``0..K-1`` once, on construction, so that the potentials index a
fixed-size table (no data-dependent shapes inside a compiled graph).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..errors import InputTypeError, MissingDependencyError

__all__ = ["Detections", "Superpixels", "read_detections", "read_image_detections", "slic_superpixels"]


def _as_tensor(name: str, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (list, tuple)):
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as error:
            raise InputTypeError(f"{name} must be numeric, got {value!r:.80}") from error
    else:
        raise InputTypeError(f"{name} must be a tensor, an array or a list, got {type(value).__name__}")
    return tensor if dtype is None else tensor.to(dtype)


def _box_mask(box: Sequence[float], size: tuple[int, int], what: str) -> torch.Tensor:
    """The (H, W) bool mask of a box ``(x0, y0, x1, y1)`` in pixels: columns ``floor(x0) <= x < ceil(x1)``, rows
    ``floor(y0) <= y < ceil(y1)``, clipped to the image."""
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"{what} must be finite (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got ({x0}, {y0}, {x1}, {y1})"
        )
    mask = torch.zeros((height, width), dtype=torch.bool)
    mask[max(0, math.floor(y0)) : min(height, math.ceil(y1)), max(0, math.floor(x0)) : min(width, math.ceil(x1))] = True
    return mask


@dataclass(frozen=True)
class Detections:
    """Object detections of a batch of images, padded to D per image.

    Each detection d of image b has a label ``labels[b, d]``, a score ``scores[b, d]`` (> 0; 0 marks padding) and
    foreground pixels ``masks[b, d]`` (a box's pixels, or a segmentation mask). The CRF's detection potential gives each
    a latent binary variable Y (is the detection right?), inferred with the pixels in every mean-field iteration.

    Attributes:
        labels: (B, D) int64 class labels.
        scores: (B, D) float32 scores (the detector's confidence; caffe-tvg's ``max_score`` divides them for Y's
            initial marginal, see :class:`~crfasrnn.higher_order.HigherOrderPotentials`).
        masks: (B, D, H, W) bool foreground pixels.

    Example:
        >>> dets = Detections.from_boxes([[(2, 1, 6, 4)]], [[1]], [[0.9]], size=(5, 8))
        >>> dets.masks.shape, int(dets.masks.sum())
        (torch.Size([1, 1, 5, 8]), 12)
    """

    labels: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor

    def __post_init__(self) -> None:
        for name, value, ndim in (("labels", self.labels, 2), ("scores", self.scores, 2), ("masks", self.masks, 4)):
            if not isinstance(value, torch.Tensor):
                raise InputTypeError(f"detections' {name} must be a torch.Tensor, got {type(value).__name__}")
            if value.ndim != ndim:
                raise ValueError(f"detections' {name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
        if self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise InputTypeError(f"detections' labels must be integers, got dtype {self.labels.dtype}")
        if not self.scores.is_floating_point():
            raise InputTypeError(f"detections' scores must be floating point, got dtype {self.scores.dtype}")
        if self.masks.dtype != torch.bool:
            raise InputTypeError(f"detections' masks must be bool, got dtype {self.masks.dtype}")
        if not (self.labels.shape == self.scores.shape == self.masks.shape[:2]):
            raise ValueError(
                f"detections' labels {tuple(self.labels.shape)}, scores {tuple(self.scores.shape)} and masks "
                f"{tuple(self.masks.shape)} must agree on (B, D)"
            )
        if self.scores.numel() and _has_data(self.scores, self.labels):
            if not bool(torch.isfinite(self.scores).all()) or bool((self.scores < 0).any()):
                raise ValueError("detections' scores must be finite and >= 0 (0 marks padding)")
            if bool((self.labels < 0).any()):
                raise ValueError(f"detections' labels must be >= 0, got {int(self.labels.min())}")

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """The images' (H, W)."""
        return int(self.masks.shape[2]), int(self.masks.shape[3])

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.labels.to(device), self.scores.to(device), self.masks.to(device))

    @classmethod
    def from_masks(
        cls,
        masks: Sequence[Any],
        labels: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]],
        *,
        size: tuple[int, int] | None = None,
    ) -> Detections:
        """Per image: a (D_b, H, W) stack of foreground masks (anything nonzero is foreground), D_b labels and scores.

        Images with no detections take an empty (0, H, W) stack (or an empty list); ``size`` gives the images' (H,
        W) where no image has a detection (by default the masks' size).
        """
        stacks = [_as_tensor(f"masks[{b}]", m) for b, m in enumerate(masks)]
        sizes = {(int(s.shape[-2]), int(s.shape[-1])) for s in stacks if s.ndim == 3 and s.shape[0] > 0}
        if size is not None:
            sizes.add((int(size[0]), int(size[1])))
        if len(sizes) > 1:
            raise ValueError(f"every image's masks must have one size (H, W), got {sorted(sizes)}")
        if not sizes:
            raise ValueError("from_masks needs the size of the images: give size=(H, W) or a (D, H, W) stack of masks")
        (image_size,) = sizes
        empty = torch.zeros((0, *image_size), dtype=torch.bool)
        stacks = [empty if s.numel() == 0 else s for s in stacks]
        for b, s in enumerate(stacks):
            if s.ndim != 3 or tuple(s.shape[1:]) != image_size:
                raise ValueError(f"masks[{b}] must be (D, H, W) with H, W = {image_size}, got shape {tuple(s.shape)}")
        return cls._pad([s != 0 for s in stacks], labels, scores, image_size)

    @classmethod
    def from_boxes(
        cls,
        boxes: Sequence[Any],
        labels: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]],
        *,
        size: tuple[int, int],
    ) -> Detections:
        """Per image: D_b boxes ``(x0, y0, x1, y1)`` in pixels, their labels and scores; the mask of a box is its
        pixels, columns ``floor(x0) <= x < ceil(x1)`` and rows ``floor(y0) <= y < ceil(y1)``, clipped to the image.

        (The paper takes each box's foreground with GrabCut; give such masks to :meth:`from_masks` instead.)
        """
        height, width = size
        stacks = []
        for b, image_boxes in enumerate(boxes):
            table = _as_tensor(f"boxes[{b}]", image_boxes, torch.float64).reshape(-1, 4) if len(image_boxes) else None
            stack = torch.zeros((0 if table is None else table.shape[0], height, width), dtype=torch.bool)
            for d, box in enumerate([] if table is None else table.tolist()):
                stack[d] = _box_mask(box, size, f"box {d} of image {b}")
            stacks.append(stack)
        return cls._pad(stacks, labels, scores, size)

    @classmethod
    def _pad(cls, stacks, labels, scores, size) -> Detections:
        if not (len(stacks) == len(labels) == len(scores)):
            raise ValueError(
                f"give masks or boxes, labels and scores for every image: got {len(stacks)}, {len(labels)} and "
                f"{len(scores)} images"
            )
        count = max((s.shape[0] for s in stacks), default=0)
        batch = len(stacks)
        out_labels = torch.zeros((batch, count), dtype=torch.int64)
        out_scores = torch.zeros((batch, count), dtype=torch.float32)
        out_masks = torch.zeros((batch, count, *size), dtype=torch.bool)
        for b, (stack, image_labels, image_scores) in enumerate(zip(stacks, labels, scores)):
            d = stack.shape[0]
            lab = _as_tensor(f"labels[{b}]", list(image_labels)).reshape(-1)
            sco = _as_tensor(f"scores[{b}]", list(image_scores), torch.float32).reshape(-1)
            if lab.numel() != d or sco.numel() != d:
                raise ValueError(f"image {b} has {d} detections but {lab.numel()} labels and {sco.numel()} scores")
            if d and (lab.is_floating_point() and not bool((lab == lab.round()).all())):
                raise ValueError(f"labels of image {b} must be integers, got {lab.tolist()}")
            if d and not bool((sco > 0).all()):
                raise ValueError(f"scores of image {b} must be > 0, got {sco.tolist()}")
            out_labels[b, :d] = lab.to(torch.int64)
            out_scores[b, :d] = sco
            out_masks[b, :d] = stack
        return cls(out_labels, out_scores, out_masks)


def _has_data(*tensors: torch.Tensor) -> bool:
    """Whether value checks can run: plain tensors with data, not the fake or functional tensors of a trace."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta" for t in tensors) and not (
        torch.compiler.is_compiling()
    )


@dataclass(frozen=True)
class Superpixels:
    """One or more superpixel segmentations (scales) of each image of a batch.

    Attributes:
        segments: (B, S, H, W) int64 segment ids, each map numbered ``0..K_bs-1``.
        num_segments: the largest K_bs (the size of the potentials' per-segment tables).

    Example:
        >>> sp = Superpixels.from_label_maps(torch.tensor([[[[5, 5, 9], [7, 7, 9]]]]))
        >>> sp.segments.tolist(), sp.num_segments
        ([[[[0, 0, 2], [1, 1, 2]]]], 3)
    """

    segments: torch.Tensor
    num_segments: int

    def __post_init__(self) -> None:
        if not isinstance(self.segments, torch.Tensor) or self.segments.ndim != 4:
            raise ValueError(
                "superpixel segments must be a (B, S, H, W) tensor, got "
                + (f"shape {tuple(self.segments.shape)}" if isinstance(self.segments, torch.Tensor) else "no tensor")
            )
        if self.segments.dtype != torch.int64:
            raise InputTypeError(f"superpixel segments must be int64, got dtype {self.segments.dtype}")
        if isinstance(self.num_segments, bool) or not isinstance(self.num_segments, int) or self.num_segments < 1:
            raise ValueError(f"num_segments must be an integer >= 1, got {self.num_segments!r}")

    @property
    def num_scales(self) -> int:
        return int(self.segments.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.segments.shape[2]), int(self.segments.shape[3])

    def to(self, device: torch.device | str) -> Superpixels:
        return Superpixels(self.segments.to(device), self.num_segments)

    @classmethod
    def from_label_maps(cls, maps: Any) -> Superpixels:
        """Superpixels from label maps: (H, W) (one image, one scale), (S, H, W) (one image) or (B, S, H, W), of any
        integer values (each distinct value of a map is a segment; it need not be connected)."""
        tensor = _as_tensor("superpixel label maps", maps)
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise InputTypeError(f"superpixel label maps must be integers, got dtype {tensor.dtype}")
        if tensor.ndim not in (2, 3, 4) or tensor.numel() == 0:
            raise ValueError(
                f"superpixel label maps must be (H, W), (S, H, W) or (B, S, H, W), got shape {tuple(tensor.shape)}"
            )
        while tensor.ndim < 4:
            tensor = tensor[None]
        b, s, h, w = tensor.shape
        flat = tensor.reshape(b * s, h * w).to(torch.int64)
        out = torch.empty_like(flat)
        count = 1
        for row in range(b * s):
            values, inverse = torch.unique(flat[row], return_inverse=True)
            out[row] = inverse
            count = max(count, int(values.numel()))
        return cls(out.view(b, s, h, w), count)


# Both are pytree nodes (their tensors the children, the segment count a constant), so that torch.export and
# torch.compile take them as inputs like tensors.
pytree.register_pytree_node(
    Detections,
    lambda d: ([d.labels, d.scores, d.masks], None),
    lambda children, _: Detections(*children),
    serialized_type_name="crfasrnn.higher_order.Detections",
    flatten_with_keys_fn=lambda d: (
        [(pytree.GetAttrKey(name), getattr(d, name)) for name in ("labels", "scores", "masks")],
        None,
    ),
)
pytree.register_pytree_node(
    Superpixels,
    lambda s: ([s.segments], s.num_segments),
    lambda children, count: Superpixels(next(iter(children)), count),
    serialized_type_name="crfasrnn.higher_order.Superpixels",
    flatten_with_keys_fn=lambda s: ([(pytree.GetAttrKey("segments"), s.segments)], s.num_segments),
)


def slic_superpixels(images: Any, num_segments: Sequence[int] | int, *, compactness: float = 10.0) -> Superpixels:
    """SLIC superpixels (scikit-image, the ``superpixels`` extra) at one or more scales.

    Args:
        images: (H, W, 3) or (B, H, W, 3) uint8 RGB images (arrays or tensors).
        num_segments: the approximate number of superpixels of each scale, e.g. ``(100, 200, 400)``.
        compactness: SLIC's balance of colour and space (higher: more compact segments); SLIC is deterministic.

    Returns:
        :class:`Superpixels` of shape (B, S, H, W).

    Raises:
        MissingDependencyError: scikit-image is not installed.
    """
    try:
        from skimage.segmentation import slic
    except ImportError as error:  # pragma: no cover - exercised only where scikit-image is absent
        raise MissingDependencyError("superpixels need scikit-image: pip install 'crfasrnn[superpixels]'") from error
    scales = [num_segments] if isinstance(num_segments, int) else list(num_segments)
    if not scales or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in scales):
        raise ValueError(f"num_segments must be integers >= 1, got {num_segments!r}")
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3) or (B, H, W, 3) RGB, got shape {array.shape}")
    maps = np.stack(
        [
            np.stack([slic(image, n_segments=n, compactness=compactness, start_label=0) for n in scales])
            for image in array
        ]
    )
    return Superpixels.from_label_maps(maps)


def read_image_detections(
    folder: str | os.PathLike, stem: str, size: tuple[int, int], num_classes: int | None = None
) -> Detections:
    """The detections of image ``stem`` in a folder of ``<stem>.json`` files (:func:`read_detections`): none where
    the folder has no file for it."""
    path = Path(folder) / f"{stem}.json"
    if not path.is_file():
        return Detections.from_masks([[]], [[]], [[]], size=size)
    return read_detections(path, size, num_classes)


def read_detections(path: str | os.PathLike, size: tuple[int, int], num_classes: int | None = None) -> Detections:
    """Read the detections of one image from a JSON file.

    The file holds a list (or ``{"detections": [...]}``) of objects with ``label`` (an integer class), ``score``
    (> 0) and either ``box`` (``[x0, y0, x1, y1]`` in pixels) or ``mask`` (a PNG file, relative to the JSON file's
    folder, of the image's size: nonzero pixels are the foreground)::

        [{"label": 15, "score": 0.92, "box": [40, 12, 180, 300]},
         {"label": 8, "score": 0.6, "mask": "cat_mask.png"}]

    Raises:
        ValueError: the file is not such JSON, or a detection is malformed (the message names which and why).
    """
    from PIL import Image

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read detections file {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"detections file {path} is not valid JSON: {error}") from error
    if isinstance(data, dict) and "detections" in data:
        data = data["detections"]
    if not isinstance(data, list):
        raise ValueError(  # noqa: TRY004 (what a file holds: a bad file, not a bad argument)
            f'detections file {path} must hold a list of detections (or {{"detections": [...]}})'
        )
    height, width = size
    masks, labels, scores = [], [], []
    for i, item in enumerate(data):
        where = f"detection {i} of {path}"
        if not isinstance(item, dict):
            raise ValueError(  # noqa: TRY004 (what a file holds)
                f"{where} must be an object with label, score and box or mask, got {item!r:.60}"
            )
        label, score = item.get("label"), item.get("score")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"{where}: label must be an integer >= 0, got {label!r}")
        if num_classes is not None and label >= num_classes:
            raise ValueError(f"{where}: label {label} is beyond the {num_classes} classes")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or score <= 0:
            raise ValueError(f"{where}: score must be a number > 0, got {score!r}")
        if ("box" in item) == ("mask" in item):
            raise ValueError(f"{where} must have exactly one of box and mask")
        if "box" in item:
            box = item["box"]
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise ValueError(f"{where}: box must be [x0, y0, x1, y1], got {box!r}")
            x0, y0, x1, y1 = (float(v) for v in box)
            if x1 <= x0 or y1 <= y0 or x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise ValueError(f"{where}: box {box} is empty or outside the {width}x{height} image")
            mask = _box_mask(box, size, where)
        else:
            mask_path = path.parent / str(item["mask"])
            try:
                with Image.open(mask_path) as image:
                    array = np.asarray(image.convert("L"))
            except OSError as error:
                raise ValueError(f"{where}: cannot read mask {mask_path}: {error}") from error
            if array.shape != (height, width):
                raise ValueError(
                    f"{where}: mask {mask_path} is {array.shape[1]}x{array.shape[0]}, the image {width}x{height}"
                )
            mask = torch.from_numpy(array != 0)
            if not bool(mask.any()):
                raise ValueError(f"{where}: mask {mask_path} is empty")
        masks.append(mask)
        labels.append(label)
        scores.append(float(score))
    stack = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.bool)
    return Detections._pad([stack], [labels], [scores], size)
