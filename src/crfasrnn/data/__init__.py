"""Datasets and transforms for training and evaluating segmentation networks.

Layouts (see :func:`open_dataset`):

* PASCAL VOC: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 = ignore) and
  ``ImageSets/Segmentation/{split}.txt``; the SBD-augmented set (``SegmentationClassAug/`` with
  ``ImageSets/SegmentationAug/{split}.txt``, e.g. ``train_aug``) is a second split source when present.
* Plain folders: ``{split}/images/`` and ``{split}/masks/`` matched by file stem.

A sample is ``(image, label)``: a (3, H, W) uint8 RGB tensor and an (H, W) int64 label tensor. Preprocessing for the
network (mean subtraction, BGR) happens on the batch, in the training and evaluation loops.
"""

from .datasets import (
    FolderSegmentation,
    SegmentationDataset,
    VOCSegmentation,
    default_class_names,
    open_dataset,
    read_label_map,
)
from .synthetic import make_synthetic_voc
from .transforms import EvalTransform, TrainTransform, preprocess_batch

__all__ = [
    "SegmentationDataset",
    "VOCSegmentation",
    "FolderSegmentation",
    "open_dataset",
    "read_label_map",
    "default_class_names",
    "TrainTransform",
    "EvalTransform",
    "preprocess_batch",
    "make_synthetic_voc",
]
