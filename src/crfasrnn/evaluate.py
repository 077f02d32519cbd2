"""Segmentation metrics from a confusion matrix, and evaluation of label PNGs or of a network on a dataset.

The confusion matrix counts pixels by (true class, predicted class); pixels labelled 255 are ignored, and a label or
prediction outside ``0..C-1`` is an error. From it:

* pixel accuracy = trace / total,
* mean accuracy = mean over classes present in the ground truth of (correct / true pixels),
* IoU_c = TP_c / (TP_c + FP_c + FN_c); NaN for a class absent from both ground truth and predictions,
* mean IoU = mean of the IoUs that are not NaN (as in the PASCAL VOC development kit and FCN's ``score.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.datasets import IGNORE_INDEX, SegmentationDataset, read_label_map
from .data.higher_order import HigherOrderDataset, collate_higher_order
from .data.transforms import preprocess_batch
from .models import CrfRnnNet, FCN8s

__all__ = [
    "confusion_matrix",
    "ConfusionMatrix",
    "SegmentationMetrics",
    "segmentation_metrics",
    "evaluate_predictions",
    "evaluate_model",
    "model_confusion",
    "plot_class_iou",
]

logger = logging.getLogger(__name__)


def _check_range(values: torch.Tensor, num_classes: int, what: str, allow_ignore: bool) -> None:
    bad = (values < 0) | (values >= num_classes)
    if allow_ignore:
        bad &= values != IGNORE_INDEX
    if bool(bad.any()):
        found = sorted({int(v) for v in values[bad].unique()[:8]})
        extra = f" (or {IGNORE_INDEX} = ignore)" if allow_ignore else ""
        raise ValueError(f"{what} holds values {found} outside the class range 0..{num_classes - 1}{extra}")


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Count pixels by (true class, predicted class).

    Args:
        prediction: predicted class indices.
        target: true class indices; pixels equal to ``ignore_index`` are not counted.
        num_classes: C.

    Returns:
        (C, C) int64 tensor on the inputs' device; entry [t, p] counts pixels of class t predicted as p.

    Raises:
        ValueError: shapes differ, or a value lies outside ``0..C-1`` (other than ``ignore_index`` in ``target``).

    Shape:
        - prediction, target: any shape, the same for both.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 255]), 3)
        tensor([[1, 0, 0],
                [0, 1, 0],
                [0, 1, 0]])
    """
    prediction, target = torch.as_tensor(prediction), torch.as_tensor(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target shape {tuple(target.shape)}")
    if prediction.dtype.is_floating_point or target.dtype.is_floating_point:
        raise ValueError(f"labels must be integers, got {prediction.dtype} and {target.dtype}")
    prediction, target = prediction.long().reshape(-1), target.long().reshape(-1)
    _check_range(target, num_classes, "target", allow_ignore=True)
    keep = target != ignore_index
    prediction, target = prediction[keep], target[keep]
    _check_range(prediction, num_classes, "prediction", allow_ignore=False)
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass
class SegmentationMetrics:
    """Metrics from one confusion matrix. ``iou[c]`` is NaN for a class seen neither in truth nor in predictions."""

    pixel_accuracy: float
    mean_accuracy: float
    mean_iou: float
    iou: list[float]
    class_names: list[str]
    confusion: list[list[int]] = field(repr=False)

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN becomes ``None``)."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "pixel_accuracy": clean(self.pixel_accuracy),
            "mean_accuracy": clean(self.mean_accuracy),
            "mean_iou": clean(self.mean_iou),
            "iou": {name: clean(v) for name, v in zip(self.class_names, self.iou)},
            "confusion": self.confusion,
        }

    def format_table(self) -> str:
        """A plain-text table: IoU per class, then the summary figures (in percent)."""
        width = max(12, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  IoU %"]
        for name, value in zip(self.class_names, self.iou):
            lines.append(f"{name:<{width}}  {'   n/a' if math.isnan(value) else f'{100 * value:6.2f}'}")
        lines.append("-" * (width + 8))
        for label, value in (
            ("pixel acc", self.pixel_accuracy),
            ("mean acc", self.mean_accuracy),
            ("mean IoU", self.mean_iou),
        ):
            lines.append(f"{label:<{width}}  {100 * value:6.2f}")
        return "\n".join(lines)


def segmentation_metrics(
    confusion: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None
) -> SegmentationMetrics:
    """Pixel accuracy, mean accuracy, per-class IoU and mean IoU of a (C, C) confusion matrix (rows = truth).

    Example:
        >>> m = segmentation_metrics(torch.tensor([[3, 1], [0, 2]]))
        >>> round(m.pixel_accuracy, 4), round(m.mean_accuracy, 4), [round(v, 4) for v in m.iou]
        (0.8333, 0.875, [0.75, 0.6667])
    """
    cm = torch.as_tensor(confusion).detach().to("cpu", torch.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be (C, C), got shape {tuple(cm.shape)}")
    num_classes = cm.shape[0]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for a {num_classes}-class confusion matrix")
    tp = cm.diagonal()
    truth, predicted, total = cm.sum(1), cm.sum(0), cm.sum()
    union = truth + predicted - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(truth > 0, tp / truth.clamp(min=1), nan)
    return SegmentationMetrics(
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_accuracy=float(acc.nanmean()),
        mean_iou=float(iou.nanmean()),
        iou=[float(v) for v in iou],
        class_names=names,
        confusion=torch.as_tensor(confusion).long().tolist(),
    )


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches (on the device of the first update).

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
        >>> cm.update(torch.tensor([[1]]), torch.tensor([[1]]))
        >>> cm.matrix.tolist()
        [[1, 1], [0, 1]]
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        counts = confusion_matrix(prediction, target, self.num_classes)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def compute(self, class_names: Sequence[str] | None = None) -> SegmentationMetrics:
        return segmentation_metrics(self.matrix, class_names)


def _identity(iterable: Iterable) -> Iterable:
    return iterable


def evaluate_predictions(
    dataset: SegmentationDataset,
    predictions: str | os.PathLike,
    *,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> SegmentationMetrics:
    """Score label PNGs named ``<id>.png`` in folder ``predictions`` against ``dataset``'s ground truth.

    Raises:
        FileNotFoundError: the folder, or the prediction for some sample, is missing.
        ValueError: a prediction's size differs from its ground truth, or holds a value outside the class range.
    """
    folder = Path(predictions)
    if not folder.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {folder}")
    missing = [stem for stem in dataset.ids if not (folder / f"{stem}.png").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(dataset)} predictions are missing from {folder}, e.g. {missing[0]}.png"
        )
    accumulator = ConfusionMatrix(dataset.num_classes)
    for (_, label_path), stem in (progress or _identity)(list(zip(dataset.samples, dataset.ids))):
        target = torch.from_numpy(read_label_map(label_path))
        prediction = torch.from_numpy(read_label_map(folder / f"{stem}.png"))
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {folder / f'{stem}.png'} is {prediction.shape[1]}x{prediction.shape[0]} but the ground "
                f"truth {label_path} is {target.shape[1]}x{target.shape[0]}"
            )
        try:
            accumulator.update(prediction, target)
        except ValueError as exc:
            raise ValueError(f"{stem}: {exc}") from None
    return accumulator.compute(dataset.class_names)


@torch.no_grad()
def model_confusion(
    model: FCN8s | CrfRnnNet,
    dataset: SegmentationDataset | HigherOrderDataset,
    *,
    device: str | torch.device = "cpu",
    num_iterations: int | None = None,
    indices: Sequence[int] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``dataset`` (full-size images, one at a time) and count pixels by (truth, prediction).

    For a :class:`~crfasrnn.models.CrfRnnNet` one backbone pass gives both the FCN's prediction and the CRF's (with
    ``num_iterations`` mean-field steps; default: the model's own), so the CRF's gain is measured on the same unaries.
    A :class:`~crfasrnn.data.higher_order.HigherOrderDataset` gives the CRF each image's detections and superpixels.

    Returns:
        ``{"fcn": (C, C)}`` or ``{"fcn": ..., "crf": ...}`` int64 confusion matrices on ``device``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    crf = model.crf if isinstance(model, CrfRnnNet) else None
    matrices = {h: ConfusionMatrix(dataset.num_classes) for h in (["fcn", "crf"] if crf is not None else ["fcn"])}
    iterations = 0  # (a plain FCN-8s has no CRF steps)
    if crf is not None:
        iterations = crf.num_iterations if num_iterations is None else num_iterations
    try:
        for index in (progress or _identity)(list(range(len(dataset)) if indices is None else indices)):
            inputs: dict[str, Any] = {}
            if isinstance(dataset, HigherOrderDataset):
                images, label, detections, superpixels = collate_higher_order([dataset[index]])
                given = {"detections": detections, "superpixels": superpixels}
                inputs = {k: v.to(device) for k, v in given.items() if v is not None}
            else:
                image, label = dataset[index]
                images, label = image[None], label[None]
            x = preprocess_batch(images.to(device))
            label = label.to(device)
            unary = model.unary(x) if isinstance(model, CrfRnnNet) else model(x)
            matrices["fcn"].update(unary.argmax(1), label)
            if crf is not None:
                saved = crf.num_iterations
                crf.num_iterations = iterations
                try:
                    out = crf(unary, x, **inputs) if iterations > 0 else unary
                finally:
                    crf.num_iterations = saved
                matrices["crf"].update(out.argmax(1), label)
    finally:
        model.train(was_training)
    return {h: m.matrix.to(device) for h, m in matrices.items()}


def evaluate_model(
    model: FCN8s | CrfRnnNet,
    dataset: SegmentationDataset | HigherOrderDataset,
    *,
    device: str | torch.device = "cpu",
    num_iterations: int | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, SegmentationMetrics]:
    """Metrics of ``model`` on ``dataset``: ``{"fcn": ...}``, plus ``"crf"`` for a CRF-RNN (see
    :func:`model_confusion`)."""
    matrices = model_confusion(model, dataset, device=device, num_iterations=num_iterations, progress=progress)
    return {h: segmentation_metrics(m, dataset.class_names) for h, m in matrices.items()}


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically (temporary name in the same folder, then rename)."""
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(json.dumps(data, indent=2).encode() + b"\n", Path(path))


def plot_class_iou(metrics: SegmentationMetrics | dict[str, SegmentationMetrics], path: str | os.PathLike) -> None:
    """Bar chart of the per-class IoU (one bar group per entry of a dict, e.g. ``{"FCN": m1, "CRF-RNN": m2}``).

    Needs matplotlib (``pip install crfasrnn[train]``).
    """
    from .plots import bar_chart_iou

    runs = metrics if isinstance(metrics, dict) else {"": metrics}
    bar_chart_iou(runs, Path(path))
