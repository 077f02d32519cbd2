"""Reading and writing images and label maps, the PASCAL VOC palette, and side-by-side figures.

Images as arrays are (H, W, 3) uint8 RGB; label maps are (H, W) integer arrays (255 = ignore / unknown).
Every file is written to a temporary name in the destination folder and renamed, so that a reader never sees a
partial file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "voc_palette",
    "read_image",
    "read_photo",
    "overlay_labels",
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


# Pillow modes of 8-bit images that convert to RGB without loss of meaning (alpha is dropped, as the reference does).
_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """Read a photograph to segment as (H, W, 3) uint8 RGB, upright (EXIF orientation applied).

    8-bit grayscale, palette and CMYK images are converted to RGB and an alpha channel is dropped (as the reference
    demo does with ``[:, :, :3]``); each conversion is logged. Images of more than 8 bits per sample (16-bit,
    32-bit integer or float) are refused: mapping them to 0..255 would be a guess about their range.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a readable image, corrupt or truncated, or not 8 bits per sample.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in _CONVERTIBLE_MODES:
                raise ValueError(
                    f"cannot segment {path}: Pillow mode {mode!r} is not an 8-bit image (16-bit or floating-point "
                    "images are not supported; convert it to 8-bit RGB first)"
                )
            im = ImageOps.exif_transpose(im)
            if mode != "RGB":
                logger.info("%s: converting %s image to RGB", path, mode)
                im = im.convert("RGB")
            array = np.asarray(im).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"cannot segment {path}: the image is empty ({array.shape[1]}x{array.shape[0]})")
    return array


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


def overlay_labels(
    image: np.ndarray,
    labels: np.ndarray,
    class_names,
    *,
    alpha: float = 0.55,
    palette: np.ndarray | None = None,
) -> np.ndarray:
    """The photo with its labels' VOC colours blended in, and a legend strip below naming the classes present.

    Label 0 (background) and 255 (ignore) keep the photo's colours; the legend lists every other label that occurs,
    with its colour and its share of the pixels.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        labels: (H, W) integer label map of the same size.
        class_names: names indexed by label.
        alpha: opacity of the label colours.

    Returns:
        (H + legend height, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape} must have the same H, W")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    palette = voc_palette() if palette is None else palette
    colours = colorize(labels, palette).astype(np.float32)
    mask = ((labels != 0) & (labels != 255))[..., None]
    blended = np.where(mask, (1 - alpha) * image + alpha * colours, image)
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    present = [int(v) for v in np.unique(labels) if v != 255]
    total = labels.size
    font = ImageFont.load_default()
    line = 16
    width = out.shape[1]
    entries = []
    for v in present:
        name = class_names[v] if v < len(class_names) else f"class_{v}"
        entries.append((v, f"{name} {100.0 * np.count_nonzero(labels == v) / total:.1f}%"))
    # lay the entries out in rows that fit the image width
    rows, row, x = [], [], 4
    for v, text in entries:
        w = 18 + int(font.getlength(text)) + 12
        if row and x + w > width:
            rows.append(row)
            row, x = [], 4
        row.append((v, text, x))
        x += w
    if row:
        rows.append(row)
    legend = Image.new("RGB", (width, line * max(1, len(rows)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for r, items in enumerate(rows):
        y = 2 + r * line
        for v, text, x0 in items:
            draw.rectangle([x0, y + 2, x0 + 12, y + 13], fill=tuple(int(c) for c in palette[v % len(palette)]),
                           outline=(0, 0, 0))
            draw.text((x0 + 18, y + 2), text, fill=(0, 0, 0), font=font)
    return np.concatenate([out, np.asarray(legend)], axis=0)


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
