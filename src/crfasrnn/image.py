"""Reading and writing images and label maps, the PASCAL VOC palette, and side-by-side figures.

Images as arrays are (H, W, 3) uint8 RGB; label maps are (H, W) integer arrays (255 = ignore / unknown).
Every file is written to a temporary name in the destination folder and renamed, so that a reader never sees a
partial file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "voc_palette",
    "read_image",
    "colorize",
    "save_label_map",
    "save_image",
    "side_by_side",
    "bundled_photo_path",
]


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map: bit-interleaved RGB colours, entry 0 black, 1 (128,0,0), 2 (0,128,0), ...

    Returns:
        (num_entries, 3) uint8 array.
    """
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for label in range(num_entries):
        c = label
        r = g = b = 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """(H, W) integer labels to (H, W, 3) uint8 colours with the VOC palette."""
    palette = voc_palette() if palette is None else palette
    return palette[np.asarray(labels, dtype=np.int64) % len(palette)]


def _atomic_save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_label_map(labels: np.ndarray, path: str | os.PathLike) -> None:
    """Write (H, W) labels in 0..255 as a palette PNG with the VOC colours (atomically)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must lie in 0..255 to be written as a palette PNG, got {labels.min()}..{labels.max()}")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    _atomic_save(im, Path(path))


def save_image(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, 3) uint8 RGB array as PNG (atomically)."""
    _atomic_save(Image.fromarray(np.asarray(image, dtype=np.uint8)), Path(path))


def side_by_side(*images: np.ndarray, gap: int = 8) -> np.ndarray:
    """Place (H, W, 3) uint8 images of one height side by side on a white background."""
    height = images[0].shape[0]
    if any(im.shape[0] != height for im in images):
        raise ValueError(f"images must share one height, got {[im.shape for im in images]}")
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for im in images:
        canvas[:, x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas


def bundled_photo_path() -> Path:
    """The photograph shipped with the package (NASA astronaut portrait, public domain; see data/LICENSE-images.txt)."""
    return Path(__file__).with_name("data") / "astronaut.jpg"
