"""Samples with the higher-order potentials' inputs: each image's detections and superpixels, for training and
evaluation.

:class:`HigherOrderDataset` wraps a :class:`~crfasrnn.data.SegmentationDataset`. A sample's detections are read from
``<detections folder>/<sample id>.json`` (:func:`~crfasrnn.higher_order.read_detections`: boxes or masks, labels,
scores; a sample without a file has none) and follow the random transform with the label map, so that a detection
covers the same pixels of the cropped, scaled, flipped image; a detection the crop cuts away is dropped. Its SLIC
superpixels are made on the transformed image, in the loader's worker processes. :func:`collate_higher_order` pads a
batch's detections into one :class:`~crfasrnn.higher_order.Detections` and stacks the superpixels into one
:class:`~crfasrnn.higher_order.Superpixels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..higher_order import Detections, Superpixels, read_image_detections, slic_superpixels
from .datasets import SegmentationDataset, pair_tensors

__all__ = ["HigherOrderDataset", "HigherOrderSample", "HigherOrderBatch", "collate_higher_order"]

# (image (3, H, W) uint8, label (H, W) int64, detections: (labels (D,), scores (D,), masks (D, H, W)) or None,
#  superpixels (S, H, W) int64 or None)
HigherOrderSample = tuple[
    torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, torch.Tensor | None
]
# (images (B, 3, H, W), labels (B, H, W), Detections or None, Superpixels or None)
HigherOrderBatch = tuple[torch.Tensor, torch.Tensor, Detections | None, Superpixels | None]


class HigherOrderDataset(Dataset):
    """A segmentation dataset whose samples carry detections and superpixels (see the module docstring).

    Args:
        base: the dataset of (image, label) pairs, with its transform (a :class:`~crfasrnn.data.TrainTransform` or
            :class:`~crfasrnn.data.EvalTransform`, or anything with their ``with_masks`` method).
        detections: folder of ``<sample id>.json`` detection files (None: no detections).
        superpixels: SLIC segment counts, one scale each (empty: no superpixels).
        compactness: SLIC's compactness.

    Raises:
        FileNotFoundError: the detections folder does not exist, or holds no file of any sample.
        ValueError: neither detections nor superpixels, or bad segment counts.

    Shape:
        A sample: image (3, H, W) uint8, label (H, W) int64, detections ``(labels (D,), scores (D,), masks (D, H,
        W) bool)`` or None, superpixels (S, H, W) int64 or None.
    """

    def __init__(
        self,
        base: SegmentationDataset,
        *,
        detections: str | os.PathLike | None = None,
        superpixels: Sequence[int] = (),
        compactness: float = 10.0,
    ) -> None:
        self.base = base
        self.superpixels = tuple(int(n) for n in superpixels)
        if any(n < 1 for n in self.superpixels):
            raise ValueError(f"superpixel counts must be >= 1, got {list(superpixels)}")
        if detections is None and not self.superpixels:
            raise ValueError("a HigherOrderDataset needs detections or superpixels")
        self.detections = None if detections is None else Path(detections)
        if self.detections is not None:
            if not self.detections.is_dir():
                raise FileNotFoundError(f"detections folder not found: {self.detections}")
            if not any((self.detections / f"{stem}.json").is_file() for stem in base.ids):
                raise FileNotFoundError(
                    f"the detections folder {self.detections} holds no <sample id>.json of {base.name} "
                    f"(e.g. {base.ids[0]}.json)"
                )
        self.compactness = float(compactness)

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names

    @property
    def ids(self) -> list[str]:
        return self.base.ids

    @property
    def name(self) -> str:
        return self.base.name

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _detections(self, index: int, size: tuple[int, int]) -> Detections | None:
        if self.detections is None:
            return None
        return read_image_detections(self.detections, self.base.ids[index], size, self.base.num_classes)

    def __getitem__(self, index: int) -> HigherOrderSample:
        image, label = self.base.load(index)
        found = self._detections(index, label.shape)
        masks = None if found is None else found.masks[0].numpy()
        transform = self.base.transform
        if transform is not None:
            image, label, masks = transform.with_masks(image, label, masks, self.base.rng(index))  # type: ignore[attr-defined]
        detections = None
        if found is not None and masks is not None:
            kept = torch.from_numpy(masks.any(axis=(1, 2)))  # those the crop has not cut away
            detections = (found.labels[0][kept], found.scores[0][kept], torch.from_numpy(masks)[kept])
        segments = None
        if self.superpixels:
            segments = slic_superpixels(image, self.superpixels, compactness=self.compactness).segments[0]
        return (*pair_tensors(image, label), detections, segments)

    def __repr__(self) -> str:
        parts = [repr(self.base)]
        if self.detections is not None:
            parts.append(f"detections={str(self.detections)!r}")
        if self.superpixels:
            parts.append(f"superpixels={list(self.superpixels)}")
        return f"HigherOrderDataset({', '.join(parts)})"


def collate_higher_order(samples: Sequence[HigherOrderSample]) -> HigherOrderBatch:
    """A batch of :class:`HigherOrderDataset` samples: stacked images and labels, the detections padded into one
    :class:`~crfasrnn.higher_order.Detections` (None without detections), the superpixels one
    :class:`~crfasrnn.higher_order.Superpixels` (None without)."""
    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples])
    size = (int(labels.shape[1]), int(labels.shape[2]))
    detections = None
    if samples[0][2] is not None:
        found = [s[2] for s in samples if s[2] is not None]
        detections = Detections.from_masks(
            [d[2] for d in found], [d[0].tolist() for d in found], [d[1].tolist() for d in found], size=size
        )
    superpixels = None
    if samples[0][3] is not None:
        superpixels = Superpixels.from_label_maps(torch.stack([s[3] for s in samples if s[3] is not None]))
    return images, labels, detections, superpixels
