"""A generated dataset in the PASCAL VOC layout, for tests and smoke training: coloured shapes on textured backgrounds.

Each object class has its own colour family; objects are discs, rectangles or triangles of solid (slightly noisy)
colour on a grey textured background (stripes plus noise), so a network must find edges and the CRF's bilateral
kernel has colour edges to snap to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .._checks import check_count
from ..image import save_label_map
from .datasets import IGNORE_INDEX

__all__ = ["scribble_labels", "make_synthetic_voc", "CLASS_COLOURS"]

CLASS_COLOURS = (
    ("red", (205, 45, 40)),
    ("green", (45, 175, 60)),
    ("blue", (45, 70, 215)),
    ("yellow", (225, 205, 40)),
    ("magenta", (200, 50, 200)),
    ("cyan", (40, 200, 210)),
    ("orange", (240, 130, 30)),
)


def _shape_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    size = min(height, width)
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    r = rng.uniform(0.15, 0.3) * size
    kind = rng.integers(0, 3)
    if kind == 0:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 1:  # axis-aligned rectangle of random aspect
        ry, rx = r * rng.uniform(0.6, 1.2), r * rng.uniform(0.6, 1.2)
        return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    # triangle pointing up: below the apex, inside two slanted edges
    top, bottom = cy - r, cy + r
    half = (yy - top) / (2 * r) * r * 1.1
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    grey = rng.uniform(90, 165)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, 12)
    stripes = 18 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period)
    tint = rng.uniform(-10, 10, size=3)
    noise = rng.normal(0, 10, size=(height, width, 3))
    return (grey + stripes[..., None] + tint + noise).clip(0, 255)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean mask, as masks (a flood fill; the images here are small)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    parts = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        part = np.zeros_like(mask)
        stack = [(int(y0), int(x0))]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            part[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        parts.append(part)
    return parts


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    inner = mask.copy()
    for _ in range(steps):  # one pixel per pass (4-neighbourhood)
        padded = np.pad(inner, 1, constant_values=False)
        inner &= padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner


def scribble_labels(label: np.ndarray, rng: np.random.Generator, *, margin: int = 2) -> np.ndarray:
    """Scribbles of a full label map: per connected region of each class (each object, each piece of background), a
    3-pixel-wide straight stroke at a random angle through the region's innermost pixel, kept ``margin`` pixels inside
    the region where it is wide enough (a thinner region gets its stroke within itself); every other pixel 255. So
    every object is scribbled, and a wide region never wholly.

    Example:
        >>> label = np.zeros((20, 30), np.int64)
        >>> label[5:15, 10:22] = 1
        >>> s = scribble_labels(label, np.random.default_rng(0))
        >>> sorted(np.unique(s).tolist()), bool((s != 255).mean() < 0.3)
        ([0, 1, 255], True)
    """
    height, width = label.shape
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.full_like(label, IGNORE_INDEX)
    for cls in np.unique(label):
        if cls == IGNORE_INDEX:
            continue
        for region in _components(label == cls):
            inner = _erode(region, margin)
            if not inner.any():
                inner = region
            # the innermost pixel: the one that survives the most erosions (first of them, in raster order)
            core, depth = inner, 0
            while depth < max(height, width):
                deeper = _erode(core, 1)
                if not deeper.any():
                    break
                core, depth = deeper, depth + 1
            cy, cx = (int(v[0]) for v in np.nonzero(core))
            angle = rng.uniform(0, np.pi)
            distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
            stroke = inner & (distance <= 1.0)
            if not stroke.any():
                stroke = np.zeros_like(region)
                stroke[cy, cx] = True
            out[stroke] = cls
    return out


def _box(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def _detections(
    objects: list[tuple[int, np.ndarray]], num_classes: int, false_rate: float, rng: np.random.Generator
) -> list[dict]:
    """One detection per object (its box around the pixels later objects leave visible), and perhaps a false one."""
    found = []
    covered = np.zeros_like(objects[0][1])
    for cls, mask in reversed(objects):  # later objects are drawn over earlier ones
        visible = mask & ~covered
        covered |= mask
        if visible.any():
            found.append({"label": cls, "score": round(float(rng.uniform(0.5, 1.0)), 3), "box": _box(visible)})
    if rng.random() < false_rate:
        height, width = covered.shape
        for _ in range(20):  # a box on the background: at most a tenth of it on objects
            h, w = (int(rng.integers(max(2, n // 6), max(3, n // 3))) for n in (height, width))
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            if covered[y : y + h, x : x + w].mean() <= 0.1:
                score = round(float(rng.uniform(0.3, 0.5)), 3)
                found.append({"label": int(rng.integers(1, num_classes)), "score": score, "box": [x, y, x + w, y + h]})
                break
    return found[::-1]


def make_synthetic_voc(
    root: str | os.PathLike,
    *,
    num_train: int = 16,
    num_val: int = 8,
    size: tuple[int, int] = (48, 64),
    num_classes: int = 4,
    max_objects: int = 3,
    boundary: int = 0,
    scribbles: bool = False,
    scribble_margin: int = 2,
    keep_full_labels: bool = False,
    detections: bool = False,
    false_detections: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a VOC-layout dataset of generated images under ``root`` and return ``root``.

    Writes ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (VOC palette PNGs),
    ``ImageSets/Segmentation/{train,val}.txt``
    and ``classes.txt``. The result depends only on the arguments.

    Args:
        root: output folder (created).
        num_train, num_val: images in the two splits.
        size: (height, width) of every image.
        num_classes: classes including the background (2..8).
        max_objects: each image holds 1..max_objects shapes.
        boundary: width in pixels of a band of 255 (ignore) drawn around each object, as in VOC's annotations.
        scribbles: label the training images with scribbles only (:func:`scribble_labels`: a thin stroke inside each
            object and across the background, a few percent of the pixels; the rest 255), as weakly supervised
            training has them; the validation images keep their full labels, for scoring.
        scribble_margin: how far inside its region a stroke stays (pixels, where the region is wide enough): 2 reaches
            almost to every edge; people scribble further in, which leaves the boundaries to the network to find.
            The images do not depend on it.
        keep_full_labels: with ``scribbles``, also write the training images' full labels to
            ``SegmentationClassFull/``: fully supervised training on the same images (drawing the scribbles takes
            random numbers, so ``scribbles=False`` gives other images).
        seed: random seed.

    Example:
        >>> import tempfile
        >>> root = make_synthetic_voc(tempfile.mkdtemp(), num_train=2, num_val=1, size=(24, 32))
        >>> sorted(p.name for p in root.iterdir())
        ['ImageSets', 'JPEGImages', 'SegmentationClass', 'classes.txt']
    """
    if not 2 <= num_classes <= len(CLASS_COLOURS) + 1:
        raise ValueError(f"num_classes must lie in 2..{len(CLASS_COLOURS) + 1}, got {num_classes}")
    check_count("scribble_margin", scribble_margin)
    height, width = size
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    detection_rng = np.random.default_rng([seed, 1])  # its own stream: the images do not depend on ``detections``
    if detections:
        (root / "Detections").mkdir(exist_ok=True)
    splits = {"train": [f"train_{i:04d}" for i in range(num_train)], "val": [f"val_{i:04d}" for i in range(num_val)]}
    for ids in splits.values():
        for stem in ids:
            image = _background(rng, height, width)
            label = np.zeros((height, width), np.int64)
            objects = []
            for _ in range(int(rng.integers(1, max_objects + 1))):
                cls = int(rng.integers(1, num_classes))
                mask = _shape_mask(rng, height, width)
                colour = np.asarray(CLASS_COLOURS[cls - 1][1], np.float64) + rng.uniform(-20, 20, size=3)
                image[mask] = (colour + rng.normal(0, 3, size=(int(mask.sum()), 3))).clip(0, 255)
                label[mask] = cls
                objects.append((cls, mask))
            if detections:
                found = _detections(objects, num_classes, false_detections, detection_rng)
                (root / "Detections" / f"{stem}.json").write_text(json.dumps(found))
            if boundary > 0:
                padded = np.pad(label, boundary, mode="edge")
                edge = np.zeros_like(label, dtype=bool)
                for dy in range(2 * boundary + 1):
                    for dx in range(2 * boundary + 1):
                        edge |= padded[dy : dy + height, dx : dx + width] != label
                label = np.where(edge, IGNORE_INDEX, label)
            if scribbles and stem.startswith("train_"):
                if keep_full_labels:
                    (root / "SegmentationClassFull").mkdir(exist_ok=True)
                    save_label_map(label, root / "SegmentationClassFull" / f"{stem}.png")
                label = scribble_labels(label, rng, margin=scribble_margin)
            Image.fromarray(image.astype(np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
            save_label_map(label, root / "SegmentationClass" / f"{stem}.png")
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s in ids))
    names = ["background"] + [name for name, _ in CLASS_COLOURS[: num_classes - 1]]
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    return root
