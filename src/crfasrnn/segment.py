"""Semantic segmentation of photos with the trained CRF-RNN network: one image, or many files to a folder.

The pipeline is the reference demo's (docs/reference.md §5): resize so the longer side is at most 500, subtract the
RGB mean and flip to BGR, zero-pad to 500×500, run the network, argmax, crop the padding away, resize the label map back
to the photo's size (nearest neighbour). Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .image import overlay_labels, read_photo, save_image, save_label_map
from .transforms import NETWORK_SIZE, VOC_MEAN_RGB, postprocess, prepare

logger = logging.getLogger(__name__)

__all__ = [
    "SegmentResult",
    "segment_image",
    "class_shares",
    "check_writable_folder",
    "segment_file",
]


@torch.no_grad()
def segment_image(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    max_size: int = NETWORK_SIZE,
    upscale: bool = False,
    pad: bool = True,
    mean_rgb=VOC_MEAN_RGB,
) -> np.ndarray:
    """Label map (H, W) uint8 of an (H, W, 3) uint8 RGB photo.

    Args:
        model: a network taking the preprocessed (B, 3, H, W) tensor (e.g. :class:`~crfasrnn.models.CrfRnnNet`);
            it is run in eval mode on its own device.
        image: the photo.
        max_size: the longer side is resized to at most this (500 in the reference).
        upscale: also enlarge photos smaller than ``max_size`` (the PyTorch port does; the Caffe demo does not).
        pad: zero-pad to ``max_size`` × ``max_size`` as the reference does (the network accepts any size, but
            padding reproduces the published model's inputs exactly).

    Example:
        >>> from crfasrnn import CrfRnnNet
        >>> net = CrfRnnNet(num_classes=3, num_iterations=1, width=1 / 32)
        >>> segment_image(net, np.zeros((30, 40, 3), np.uint8), max_size=40).shape
        (30, 40)
    """
    prepared = prepare(image, max_size=max_size, upscale=upscale, pad=pad, mean_rgb=mean_rgb)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(prepared.tensor[None].to(device))[0]
    finally:
        model.train(was_training)
    return postprocess(logits, prepared.resized_size, prepared.original_size)


def class_shares(labels: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str, float]]:
    """``(label, name, share of pixels)`` of every label present, largest share first.

    Example:
        >>> class_shares(np.array([[0, 15], [15, 15]]), ["background"] + ["x"] * 14 + ["person"])
        [(15, 'person', 0.75), (0, 'background', 0.25)]
    """
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    total = int(counts.sum())
    out = [
        (int(v), class_names[v] if v < len(class_names) else f"class_{v}", int(c) / total)
        for v, c in zip(values, counts)
    ]
    return sorted(out, key=lambda t: (-t[2], t[0]))


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be created in it (by creating and removing one).

    Raises:
        OSError: with a message naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".crfasrnn-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc
    return folder


@dataclasses.dataclass
class SegmentResult:
    """What :func:`segment_file` made of one photo."""

    image_path: Path
    label_path: Path
    overlay_path: Path | None
    size: tuple[int, int]  #: (H, W) of the photo and of the label map
    shares: list[tuple[int, str, float]]  #: (label, class name, share of pixels), largest first


def segment_file(
    model: torch.nn.Module,
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    class_names: Sequence[str],
    name: str | None = None,
    overlay: bool = False,
    max_size: int = NETWORK_SIZE,
    upscale: bool = False,
) -> SegmentResult:
    """Segment one photo file and write ``<name>.png`` (palette label map) and, if asked, ``<name>_overlay.png``.

    Both files are written to temporary names and renamed; on any error nothing is left behind.

    Raises:
        FileNotFoundError / ValueError: the photo cannot be read (missing, corrupt, not 8-bit).
        OSError: the output cannot be written.
    """
    image_path, out_dir = Path(image_path), Path(out_dir)
    name = name or image_path.stem
    photo = read_photo(image_path)
    labels = segment_image(model, photo, max_size=max_size, upscale=upscale)
    label_path = out_dir / f"{name}.png"
    overlay_path = out_dir / f"{name}_overlay.png" if overlay else None
    picture = overlay_labels(photo, labels, class_names) if overlay else None
    save_label_map(labels, label_path)
    if overlay_path is not None and picture is not None:  # both or neither: set when overlay is asked for
        try:
            save_image(picture, overlay_path)
        except BaseException:
            label_path.unlink(missing_ok=True)  # both or neither
            raise
    return SegmentResult(image_path, label_path, overlay_path, labels.shape, class_shares(labels, class_names))
