"""Figures of training and evaluation: loss and mIoU curves, per-class IoU bars (matplotlib, Agg back end).

matplotlib is an optional dependency (``pip install crfasrnn[train]``); these functions raise
``crfasrnn.errors.MissingDependencyError`` with that hint when it is missing. Files are written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MissingDependencyError

if TYPE_CHECKING:
    from .evaluate import SegmentationMetrics

__all__ = ["plot_curves", "bar_chart_iou"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("plots need matplotlib: pip install 'crfasrnn[train]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from .checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(buffer.getvalue(), path)


def plot_curves(records: Sequence[Mapping], path: str | os.PathLike) -> None:
    """Plot training loss and validation mIoU per epoch from ``metrics.jsonl`` records.

    Records with ``"kind": "epoch"`` give ``epoch``, ``train_loss`` and optionally ``val_miou`` (and ``val_miou_fcn``).
    """
    plt = _pyplot()
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        xs = [r["epoch"] for r in epochs]
        ax_loss.plot(xs, [r["train_loss"] for r in epochs], marker="o")
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
        for key, label in (("val_miou", "mIoU"), ("val_miou_fcn", "mIoU, FCN only")):
            pts = [(r["epoch"], 100 * r[key]) for r in epochs if r.get(key) is not None and not math.isnan(r[key])]
            if pts:
                ax_iou.plot(*zip(*pts), marker="o", label=label)
        ax_iou.set(xlabel="epoch", ylabel="validation mIoU (%)", title="validation mIoU")
        if ax_iou.has_data():
            ax_iou.legend()
        fig.tight_layout()
        _save(fig, Path(path))
    finally:
        plt.close(fig)


def bar_chart_iou(runs: Mapping[str, SegmentationMetrics], path: str | os.PathLike) -> None:
    """Per-class IoU bars; ``runs`` maps a label to a :class:`~crfasrnn.evaluate.SegmentationMetrics`."""
    plt = _pyplot()
    runs = dict(runs)
    names = next(iter(runs.values())).class_names
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) * max(1, len(runs))), 4))
    try:
        width = 0.8 / len(runs)
        for k, (label, metrics) in enumerate(runs.items()):
            values = [0.0 if math.isnan(v) else 100 * v for v in metrics.iou]
            xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, values, width=width, label=f"{label} (mIoU {100 * metrics.mean_iou:.1f})".strip())
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU")
        ax.legend()
        fig.tight_layout()
        _save(fig, Path(path))
    finally:
        plt.close(fig)
