"""Reading and writing images and label maps, the PASCAL VOC palette, and side-by-side figures.

Images as arrays are (H, W, 3) uint8 RGB; label maps are (H, W) integer arrays (255 = ignore / unknown).
Every file is written to a temporary name in the destination folder and renamed, so that a reader never sees a
partial file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .files import atomic_write, check_output

logger = logging.getLogger(__name__)

__all__ = [
    "voc_palette",
    "opened_image",
    "read_image",
    "read_photo",
    "overlay_labels",
    "colorize",
    "save_label_map",
    "save_image",
    "side_by_side",
    "bundled_photo_path",
    "bundled_annotation_path",
    "Annotation",
    "read_annotation",
    "save_annotation",
    "read_probabilities",
    "overlay",
    "figure_with_legend",
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


#: The most pixels an image or label map file may have (4096², 16.8 megapixels): the CRF over a 21-class unary
#: needs about 0.5 KB per pixel, so an 8000x8000 photo would need tens of gigabytes. Read from the file's header,
#: before decoding. Change it with :func:`set_max_pixels` (``--max-pixels`` on the command line).
DEFAULT_MAX_PIXELS = 4096 * 4096
_MAX_PIXELS: list[int | None] = [DEFAULT_MAX_PIXELS]


def set_max_pixels(limit: int | None) -> int | None:
    """Set the pixel limit of image files read by this module (None: no limit); returns the previous one."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"the pixel limit must be an integer >= 1 or None, got {limit!r}")
    previous, _MAX_PIXELS[0] = _MAX_PIXELS[0], limit
    return previous


_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


@contextlib.contextmanager
def opened_image(
    path: str | os.PathLike,
    what: str = "image",
    errors: tuple[type[BaseException], ...] = (UnidentifiedImageError, OSError),
) -> Iterator[Image.Image]:
    """Open and load an image file for the ``with`` block, turning failures into one clear error.

    Args:
        path: the file.
        what: what the file is, for the messages ("image", "label map", ...).
        errors: exceptions, raised by Pillow or by the block, reported as an unreadable file.

    Raises:
        FileNotFoundError: ``{what} not found: {path}``.
        ValueError: ``cannot read {what} {path}: {reason}`` for any of ``errors``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    limit = _MAX_PIXELS[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if limit is not None and width * height > limit:  # from the header: nothing decoded yet
                    raise ValueError(
                        f"{what} {path} is {width}x{height} ({width * height:,} pixels), more than the "
                        f"limit of {limit:,} (--max-pixels changes it)"
                    )
                im.load()
                yield im
    except _BOMBS as exc:
        raise ValueError(
            f"cannot read {what} {path}: it decodes to more pixels than Pillow allows, a possible "
            f"decompression bomb ({exc})"
        ) from None
    except errors as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image.
    """
    with opened_image(path) as im:
        return np.asarray(im.convert("RGB")).copy()


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
    with opened_image(path, errors=(UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)) as im:
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
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"cannot segment {path}: the image is empty ({array.shape[1]}x{array.shape[0]})")
    return array


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """(H, W) integer labels to (H, W, 3) uint8 colours with the VOC palette."""
    palette = voc_palette() if palette is None else palette
    return palette[np.asarray(labels, dtype=np.int64) % len(palette)]


def _atomic_save(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (:func:`crfasrnn.files.atomic_write`); the name must end in .png."""
    check_output(path, suffixes=(".png",))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_label_map(labels: np.ndarray, path: str | os.PathLike) -> None:
    """Write (H, W) labels in 0..255 as a palette PNG with the VOC colours (atomically)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(
            f"labels must lie in 0..255 to be written as a palette PNG, got {labels.min()}..{labels.max()}"
        )
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
    rows: list[list[tuple[int, str, int]]] = []
    row: list[tuple[int, str, int]] = []
    x = 4
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
            draw.rectangle(
                [x0, y + 2, x0 + 12, y + 13], fill=tuple(int(c) for c in palette[v % len(palette)]), outline=(0, 0, 0)
            )
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


def bundled_annotation_path() -> Path:
    """The bundled photo's coarse annotation (palette PNG, VOC colours, 255 = unknown; see data/LICENSE-images.txt)."""
    return Path(__file__).with_name("data") / "astronaut_coarse.png"


@dataclass
class Annotation:
    """A label map read from a file, with what is needed to write a result back in the same format.

    Attributes:
        labels: (H, W) int64 labels; pixels with no label hold ``unknown_label``.
        unknown_label: the value of unlabelled pixels (``None``: every pixel is labelled).
        kind: ``"index"`` (the pixel values are the labels) or ``"color"`` (each colour is a class, black is unknown).
        mode: the file's PIL mode (``"P"``, ``"L"``, ``"I;16"``, ``"I"``, ``"RGB"``), which a result is written in.
        palette: (N, 3) uint8 palette of a ``"P"`` file, else ``None``.
        class_colors: (C, 3) uint8 colour of each class of a ``"color"`` annotation, else ``None``.
        class_values: (C,) the palette index of each class of a ``"color"`` annotation read from a ``"P"`` file.
    """

    labels: np.ndarray
    unknown_label: int | None
    kind: str
    mode: str
    palette: np.ndarray | None = None
    class_colors: np.ndarray | None = None
    class_values: np.ndarray | None = None

    @property
    def num_classes(self) -> int | None:
        """The class count a colour annotation defines (its distinct non-black colours); ``None`` for index maps."""
        return None if self.class_colors is None else len(self.class_colors)

    def colors(self) -> np.ndarray:
        """(N, 3) uint8: the colour of each label value of a result (for overlays and figures)."""
        if self.class_colors is not None:
            return self.class_colors
        if self.palette is not None:
            return self.palette
        return voc_palette()

    def encode(self, labels: np.ndarray) -> Image.Image:
        """(H, W) labels of this annotation's classes as an image in the file's format."""
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
        high = int(labels.max()) if labels.size else 0
        if labels.size and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0 to be written, got minimum {int(labels.min())}")
        if self.kind == "color":
            class_colors = self.class_colors
            if class_colors is None:
                raise ValueError("a 'color' annotation needs class_colors")
            if high >= len(class_colors):
                raise ValueError(f"label {high} has no colour: the annotation defines {len(class_colors)} colours")
            if self.mode == "P":
                class_values, palette = self.class_values, self.palette
                if class_values is None or palette is None:
                    raise ValueError("a 'color' annotation of a palette file needs class_values and palette")
                im = Image.fromarray(class_values[labels].astype(np.uint8), mode="P")
                im.putpalette(palette.reshape(-1).tolist())
                return im
            return Image.fromarray(class_colors[labels])
        if self.mode == "P":
            if high > 255:
                raise ValueError(f"label {high} does not fit a palette PNG (0..255)")
            palette = self.palette
            if palette is None:
                raise ValueError("an annotation of a palette file needs its palette")
            im = Image.fromarray(labels.astype(np.uint8), mode="P")
            im.putpalette(palette.reshape(-1).tolist())
            return im
        if self.mode == "L":
            if high > 255:
                raise ValueError(f"label {high} does not fit an 8-bit PNG (0..255)")
            return Image.fromarray(labels.astype(np.uint8), mode="L")
        if high > 65535:
            raise ValueError(f"label {high} does not fit a 16-bit PNG (0..65535)")
        return Image.fromarray(labels.astype(np.uint16), mode="I;16")


#: The most classes a colour annotation may define (more colours mean a photo or a smoothed image, not labels).
MAX_COLOR_CLASSES = 256

_INDEX_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "P")


def _follows_index_palette(palette: np.ndarray, used: np.ndarray) -> bool:
    """Whether the used palette entries are the VOC colours or a grey ramp (then the indices are the labels)."""
    voc = voc_palette()
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    return bool(np.array_equal(palette[used], voc[used]) or np.array_equal(palette[used], grey[used]))


def read_annotation(path: str | os.PathLike, *, labels_as: str = "auto", unknown_label: int | None = 255) -> Annotation:
    """Read a label map in any of the usual formats.

    - a palette PNG whose used colours are the VOC palette (or a grey ramp), an 8-bit or 16-bit grey PNG: the pixel
      values are the labels (``"index"``), and ``unknown_label`` (255 by default, VOC's "void") marks unlabelled pixels;
    - an RGB(A) image, or a palette PNG with other colours: each distinct colour is a class, black is unknown
      (``"color"``, the convention of the classic dense-CRF examples); classes are numbered by the packed colour value
      ``r + 256 g + 65536 b`` (as pydensecrf's example does) and the unknown value is -1.

    Args:
        path: the file.
        labels_as: ``"auto"`` (as above), ``"index"`` or ``"color"`` to force a reading.
        unknown_label: the unlabelled value of index maps (``None``: none).

    Raises:
        FileNotFoundError, ValueError: a missing or unreadable file, or a format that cannot hold labels.
    """
    if labels_as not in ("auto", "index", "color"):
        raise ValueError(f"labels_as must be 'auto', 'index' or 'color', got {labels_as!r}")
    path = Path(path)
    with opened_image(path, "label map", errors=(UnidentifiedImageError, OSError, ValueError)) as im:
        mode = im.mode
        values = np.asarray(im)
        palette = None
        if mode == "P":
            raw = im.getpalette() or []
            palette = np.zeros((256, 3), dtype=np.uint8)
            entries = np.asarray(raw, dtype=np.uint8).reshape(-1, 3)[:256]
            palette[: len(entries)] = entries
        rgb = np.asarray(im.convert("RGB")) if mode not in ("L", "I", "I;16", "I;16B", "I;16L") else None
    if values.ndim != 2 and mode not in ("RGB", "RGBA"):
        raise ValueError(f"label map {path} has unsupported mode {mode}")
    kind = labels_as
    if kind == "auto":
        if palette is not None:  # mode "P"
            kind = "index" if _follows_index_palette(palette, np.unique(values)) else "color"
        elif mode in _INDEX_MODES:
            kind = "index"
        elif mode in ("RGB", "RGBA"):
            kind = "color"
        else:
            raise ValueError(f"label map {path} has unsupported mode {mode}: use a palette, grey or RGB PNG")
    if kind == "index":
        if mode not in _INDEX_MODES:
            raise ValueError(f"label map {path} is {mode}, not a single-channel image: it cannot be read as indices")
        out_mode = "P" if mode == "P" else ("L" if mode == "L" else "I;16")
        return Annotation(values.astype(np.int64), unknown_label, "index", out_mode, palette=palette)
    if rgb is None:
        raise ValueError(f"label map {path} is a grey image ({mode}): it cannot be read as colours")
    packed = rgb[..., 0].astype(np.int64) | (rgb[..., 1].astype(np.int64) << 8) | (rgb[..., 2].astype(np.int64) << 16)
    codes, inverse = np.unique(packed, return_inverse=True)
    inverse = inverse.reshape(packed.shape)
    has_unknown = codes[0] == 0
    labels = inverse - 1 if has_unknown else inverse
    classes = codes[1:] if has_unknown else codes
    if len(classes) == 0:
        raise ValueError(f"label map {path} is all black: no pixel is labelled")
    if len(classes) > MAX_COLOR_CLASSES:
        raise ValueError(
            f"label map {path} has {len(classes)} colours: read as one class per colour it is not an annotation "
            f"(at most {MAX_COLOR_CLASSES}); is it a photo?"
        )
    colors = np.stack([classes & 255, (classes >> 8) & 255, (classes >> 16) & 255], axis=1).astype(np.uint8)
    class_values = None
    if palette is not None:  # mode "P"
        # the first palette index of each class colour, to write results back with the file's palette
        first = {}
        for index in np.unique(values)[::-1]:
            r, g, b = (int(x) for x in palette[index])
            first[r | (g << 8) | (b << 16)] = index
        class_values = np.array([first[int(c)] for c in classes], dtype=np.int64)
    return Annotation(
        labels.astype(np.int64),
        -1 if has_unknown else None,
        "color",
        "P" if mode == "P" else "RGB",
        palette=palette,
        class_colors=colors,
        class_values=class_values,
    )


def save_annotation(annotation: Annotation, labels: np.ndarray, path: str | os.PathLike) -> None:
    """Write (H, W) labels in the format and colours of ``annotation`` (atomically)."""
    _atomic_save(annotation.encode(labels), Path(path))


def read_probabilities(path: str | os.PathLike, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read class probabilities from a ``.npy`` file as a (C, H, W) float array.

    Accepted layouts: (C, H, W) and (H, W, C). Which one is decided by ``image_size`` (H, W): the layout whose spatial
    axes equal it, or else have its aspect ratio at a lower resolution (C, H, W wins a tie). Without ``image_size`` the
    file must be (C, H, W).

    Raises:
        FileNotFoundError, ValueError: a missing or unreadable file, or an array of another rank, dtype or size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probabilities not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
        if not magic.startswith(b"\x93NUMPY"):
            kind = (
                "a PNG image"
                if magic.startswith(b"\x89PNG")
                else "an .npz archive"
                if magic.startswith(b"PK")
                else "another format"
            )
            raise ValueError(f"not a .npy array file (it is {kind}); probabilities are (C, H, W) .npy arrays")
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read probabilities {path}: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        shape = getattr(array, "shape", None)
        raise ValueError(f"probabilities {path} must be a (C, H, W) or (H, W, C) array, got shape {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"probabilities {path} must be floating point, got dtype {array.dtype}")
    if not array.dtype.isnative:  # a big-endian file: the same numbers in this machine's byte order
        array = array.astype(array.dtype.newbyteorder("="))
    if image_size is None:
        return array
    height, width = image_size

    def fits(h: int, w: int, exact: bool) -> bool:
        if exact:
            return (h, w) == (height, width)
        return h <= height and w <= width and (abs(h - height * w / width) <= 1 or abs(w - width * h / height) <= 1)

    for exact in (True, False):
        if fits(array.shape[1], array.shape[2], exact):
            return array
        if fits(array.shape[0], array.shape[1], exact):
            return np.moveaxis(array, 2, 0)
    raise ValueError(
        f"probabilities {path} of shape {array.shape} fit neither (C, H, W) nor (H, W, C) for the image's "
        f"{height}x{width} (HxW)"
    )


def overlay(
    image: np.ndarray, labels: np.ndarray, colors: np.ndarray | None = None, *, alpha: float = 0.5
) -> np.ndarray:
    """Blend an (H, W, 3) uint8 photo with the colours of (H, W) labels: ``(1 − alpha)·photo + alpha·colour``."""
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must share H, W")
    colored = colorize(labels, colors).astype(np.float32)
    return ((1.0 - alpha) * image.astype(np.float32) + alpha * colored).round().clip(0, 255).astype(np.uint8)


def figure_with_legend(
    panels: list[np.ndarray], titles: list[str], legend: list[tuple[str, tuple[int, int, int]]], *, gap: int = 8
) -> np.ndarray:
    """Panels side by side (see :func:`side_by_side`) with a title above each and a colour legend below.

    Args:
        panels: (H, W, 3) uint8 images of one height.
        titles: one title per panel.
        legend: ``(name, (r, g, b))`` entries, drawn as swatches with their names.

    Returns:
        (H', W', 3) uint8 figure on a white background.
    """
    if len(titles) != len(panels):
        raise ValueError(f"{len(panels)} panels but {len(titles)} titles")
    row = side_by_side(*panels, gap=gap)
    font = ImageFont.load_default()
    line = 18
    swatch = 12
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + 2 * line + 8), "white")
    canvas.paste(Image.fromarray(row), (0, line))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, title in zip(panels, titles):
        draw.text((x + 2, 3), title, fill="black", font=font)
        x += panel.shape[1] + gap
    x, y = 2, line + row.shape[0] + 6
    for name, color in legend:
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in color), outline="black")
        draw.text((x + swatch + 4, y), name, fill="black", font=font)
        x += swatch + 12 + int(draw.textlength(name, font=font))
    return np.asarray(canvas)
