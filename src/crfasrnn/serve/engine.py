"""What the web app computes, without HTTP: decoding uploads within limits, segmenting, refining, encoding results.

The :class:`Engine` holds the model (loaded once, by the caller) and a lock, so that one computation runs at a time and
concurrent requests never share intermediate state; everything else is made per request. Errors meant for the client
are :class:`ClientError` with an HTTP status and a message; nothing here touches the file system except reading the
package's own sample data.
"""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import inspect
import io
import logging
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .._checks import check_count
from ..image import bundled_photo_path, overlay, read_image, voc_palette

if TYPE_CHECKING:
    from ..models import CrfRnnNet

__all__ = [
    "ClientError",
    "Limits",
    "Engine",
    "LabelMap",
    "RefineParams",
    "REFINE_PARAMETERS",
    "decode_image",
    "decode_labels",
    "class_table",
    "label_png",
]

logger = logging.getLogger(__name__)

#: Label value of pixels with no information in refinement inputs (the VOC "void" value).
UNKNOWN_LABEL = 255


class ClientError(Exception):
    """A request the server cannot serve: ``status`` is the HTTP status (4xx), ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Limits on what a client may send and on the work a request may cause.

    Attributes:
        max_upload_bytes: largest request body with uploads (all files of one request together), checked while the
            body is read.
        max_side: the largest accepted image side in pixels; larger images are downscaled to it (or refused when
            ``downscale`` is false).
        downscale: downscale oversized images (true) or refuse them with 413 (false).
        max_pixels: images with more pixels than this are refused before they are decoded (default: 4·max_side²).
        work_side: the longest side at which images are processed and results returned (smaller images keep their
            size).
        max_iterations: the most mean-field iterations a refine request may ask for.
        max_decodes: how many uploads are decoded at once (others wait): with the pixel limit, this bounds the
            memory that decoding takes, whatever the number of concurrent requests.
        body_timeout_s: a request body must arrive whole within this many seconds (else 408).
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_side: int = 4096
    downscale: bool = True
    max_pixels: int | None = None
    work_side: int = 1024
    max_iterations: int = 50
    max_decodes: int = 2
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.body_timeout_s, (int, float)) or not 0 < self.body_timeout_s < float("inf"):
            raise ValueError(f"body_timeout_s must be a finite number > 0, got {self.body_timeout_s!r}")
        for name in ("max_upload_bytes", "max_side", "work_side", "max_iterations", "max_decodes"):
            check_count(name, getattr(self, name), minimum=1)
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int) or self.max_pixels < 1):
            raise ValueError(f"max_pixels must be an integer >= 1 or None, got {self.max_pixels!r}")

    @property
    def pixel_limit(self) -> int:
        return self.max_pixels if self.max_pixels is not None else 4 * self.max_side * self.max_side


@dataclass(frozen=True)
class _Spec:
    name: str
    label: str
    minimum: float
    maximum: float
    step: float
    integer: bool = False
    help: str = ""


#: The refinement parameters the page shows as sliders (defaults are :func:`crfasrnn.refine`'s own).
_SPECS = (
    _Spec("num_iterations", "iterations", 0, 50, 1, True, "mean-field iterations"),
    _Spec("theta_alpha", "θα (bilateral, px)", 1, 200, 1, False, "positional bandwidth of the bilateral kernel"),
    _Spec("theta_beta", "θβ (colour)", 1, 100, 0.5, False, "colour bandwidth of the bilateral kernel, 0..255 units"),
    _Spec("theta_gamma", "θγ (spatial, px)", 0.5, 20, 0.5, False, "bandwidth of the spatial kernel"),
    _Spec("spatial_weight", "spatial weight", 0, 20, 0.5, False, "Potts weight of the spatial kernel"),
    _Spec("bilateral_weight", "bilateral weight", 0, 30, 0.5, False, "Potts weight of the bilateral kernel"),
    _Spec("gt_prob", "label confidence", 0.05, 0.99, 0.01, False, "probability given to a pixel's coarse label"),
)


def _refine_function():
    from ..refine import refine

    return refine


def _refine_defaults() -> dict[str, float]:
    signature = inspect.signature(_refine_function())
    return {spec.name: signature.parameters[spec.name].default for spec in _SPECS}


def refine_parameters(limits: Limits | None = None) -> list[dict[str, Any]]:
    """The slider table: name, label, min, max, step, default, integer, help (what ``GET /api/info`` reports)."""
    limits = limits or Limits()
    defaults = _refine_defaults()
    table = []
    for spec in _SPECS:
        row = asdict(spec)
        row["min"], row["max"] = row.pop("minimum"), row.pop("maximum")
        if spec.name == "num_iterations":
            row["max"] = limits.max_iterations
        row["default"] = defaults[spec.name]
        table.append(row)
    return table


REFINE_PARAMETERS = tuple(spec.name for spec in _SPECS)

#: The SLIC superpixel counts of the page's superpixel toggle (three scales, as in Arnab et al.).
SUPERPIXEL_COUNTS = (100, 200, 400)


def superpixels_available() -> bool:
    """Whether scikit-image (the ``superpixels`` extra) is installed, so that refinement can use superpixels."""
    return importlib.util.find_spec("skimage") is not None


def _parse_superpixels(raw: str | None) -> tuple[int, ...] | None:
    """The form field ``superpixels``: absent, ``false`` or ``0`` for none, ``true`` for :data:`SUPERPIXEL_COUNTS`."""
    text = "" if raw is None else str(raw).strip().lower()
    if text in ("", "false", "0", "off"):
        return None
    if text not in ("true", "1", "on"):
        raise ClientError(422, f"superpixels must be true or false, got {str(raw)[:40]!r}")
    if not superpixels_available():
        raise ClientError(422, "superpixels need scikit-image on the server: pip install 'crfasrnn[superpixels]'")
    return SUPERPIXEL_COUNTS


@dataclass(frozen=True)
class RefineParams:
    """Validated refinement parameters of one request."""

    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, fields: dict[str, str], limits: Limits) -> RefineParams:
        """Parse form fields (strings); absent fields take :func:`crfasrnn.refine`'s defaults.

        Raises:
            ClientError: a value that is not a number or lies outside the slider's range.
        """
        defaults = _refine_defaults()
        values: dict[str, Any] = {}
        superpixels = _parse_superpixels(fields.get("superpixels"))
        if superpixels is not None:  # absent: refine's default (none), and the parameters echoed stay as before
            values["superpixels"] = superpixels
        for spec in _SPECS:
            raw = fields.get(spec.name)
            if raw is None or str(raw).strip() == "":
                values[spec.name] = defaults[spec.name]
                continue
            try:
                number = float(raw)
            except ValueError:
                raise ClientError(422, f"{spec.name} must be a number, got {str(raw)[:40]!r}") from None
            maximum = limits.max_iterations if spec.name == "num_iterations" else spec.maximum
            if not np.isfinite(number) or not spec.minimum <= number <= maximum:
                raise ClientError(422, f"{spec.name} must lie in {spec.minimum:g}..{maximum:g}, got {raw}")
            if spec.integer:
                if number != int(number):
                    raise ClientError(422, f"{spec.name} must be an integer, got {raw}")
                number = int(number)
            values[spec.name] = number
        return cls(values)


_DECODE_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _decoding(limits: Limits) -> threading.BoundedSemaphore:
    """The semaphore that lets at most ``limits.max_decodes`` uploads be decoded at once (process-wide)."""
    with _SLOTS_LOCK:
        return _DECODE_SLOTS.setdefault(limits.max_decodes, threading.BoundedSemaphore(limits.max_decodes))


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image upload from its header (nothing decoded), or None where it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any unreadable upload: decode_image reports it properly
        return None


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is at most ``side`` (never enlarged)."""
    w, h = size
    if max(w, h) <= side:
        return w, h
    ratio = side / max(w, h)
    return max(1, round(w * ratio)), max(1, round(h * ratio))


def _open(data: bytes, what: str, limits: Limits) -> tuple[Image.Image, list[str]]:
    """Open an upload with Pillow, checking its size before any pixel is decoded."""
    if not data:
        raise ClientError(400, f"the {what} upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise ClientError(
            413, f"upload too large: the {what} is {len(data)} bytes; the limit is {limits.max_upload_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ClientError(
            400, f"the uploaded {what} is not an image file (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ClientError(413, f"the uploaded {what} is too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ClientError(400, f"the uploaded {what} is corrupt: {exc}") from None
    w, h = im.size
    notes: list[str] = []
    if w < 1 or h < 1:
        raise ClientError(400, f"the {what} has no pixels ({w}x{h})")
    if w * h > limits.pixel_limit or (max(w, h) > limits.max_side and not limits.downscale):
        raise ClientError(
            413,
            f"the {what} is {w}x{h} pixels; the limit is {limits.max_side}x{limits.max_side}"
            + (f"; larger images are downscaled only up to {limits.pixel_limit} pixels" if limits.downscale else ""),
        )
    return im, notes


def _load(im: Image.Image, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ClientError(400, f"the uploaded {what} is corrupt or truncated: {exc}") from None
    return im


def decode_image(data: bytes, limits: Limits, *, what: str = "image") -> tuple[np.ndarray, list[str]]:
    """Decode an uploaded photo to (H, W, 3) uint8 RGB at most ``limits.work_side`` on its longer side.

    EXIF orientation is applied; grayscale, palette, RGBA and 16-bit images are converted to RGB.

    Returns:
        The image and notes for the client (e.g. that it was downscaled).

    Raises:
        ClientError: empty, not an image, corrupt, or too large.
    """
    im, notes = _open(data, what, limits)
    with _decoding(limits):
        return _decode_image(im, what, limits, notes)


def _decode_image(im: Image.Image, what: str, limits: Limits, notes: list[str]) -> tuple[np.ndarray, list[str]]:
    original = im.size
    target = _fit(original, min(limits.max_side, limits.work_side))
    if target != original:
        im.draft("RGB", target)  # JPEG: decode at a reduced scale directly
    im = _load(im, what)
    if im.size != target and im.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I;16B", "I;16L", "I", "F"):
        # to the work size in the file's own mode (1 byte a pixel for a bilevel or palette image), before any RGB
        # conversion makes it three or four
        # Pillow sets its filter constants with setattr(): its annotations lack them
        im = im.resize(target, Image.NEAREST if im.mode in ("1", "P") else Image.BILINEAR)  # type: ignore[attr-defined]
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
        im = im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ClientError(400, f"the {what} cannot be converted to RGB: {exc}") from None
    target = _fit(im.size, min(limits.max_side, limits.work_side))
    if im.size != target:
        # Pillow sets its filter constants with setattr(): its annotations lack them
        im = im.resize(target, Image.BILINEAR)  # type: ignore[attr-defined]
    if im.size not in (original, original[::-1]):  # (EXIF rotation may swap the sides)
        reason = (
            f"larger than the {limits.max_side} px limit"
            if max(original) > limits.max_side
            else (f"images are processed at most {limits.work_side} px on the longer side")
        )
        notes.append(
            f"{what} processed at {im.size[0]}x{im.size[1]}, downscaled from {original[0]}x{original[1]} ({reason})"
        )
    return np.asarray(im).copy(), notes


@dataclass(frozen=True)
class LabelMap:
    """A label map to refine, as the engine uses it.

    Attributes:
        labels: (H, W) int64 labels in 0..C-1, with ``UNKNOWN_LABEL`` (255) where a pixel has no label.
        num_classes: C.
        palette: (256, 3) uint8 display colours (the file's own colours where it has them; entry 255 for unknown).
        names: class names, index = label.
    """

    labels: np.ndarray
    num_classes: int
    palette: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def from_annotation(cls, annotation, size: tuple[int, int], *, names=None) -> LabelMap:
        """From a :class:`crfasrnn.image.Annotation`, resized (nearest) to ``size`` = (height, width)."""
        labels = np.asarray(annotation.labels, dtype=np.int64)
        unknown = (
            np.zeros(labels.shape, bool) if annotation.unknown_label is None else labels == annotation.unknown_label
        )
        known = labels[~unknown]
        if known.size == 0:
            raise ClientError(400, "the label map has no labelled pixel (all unknown)")
        if int(known.min()) < 0 or int(known.max()) >= UNKNOWN_LABEL:
            raise ClientError(
                400,
                f"label values must lie in 0..{UNKNOWN_LABEL - 1} ({UNKNOWN_LABEL} = unknown), "
                f"got {int(known.min())}..{int(known.max())}",
            )
        num_classes = annotation.num_classes or max(int(known.max()) + 1, 2)
        display = np.where(unknown, UNKNOWN_LABEL, labels)
        height, width = size
        if display.shape != (height, width):
            display = np.asarray(
                # Pillow sets its filter constants with setattr(): its annotations lack them
                Image.fromarray(display.astype(np.uint8)).resize((width, height), Image.NEAREST)  # type: ignore[attr-defined]
            ).astype(np.int64)
        palette = voc_palette()
        colors = np.asarray(annotation.colors(), dtype=np.uint8)
        count = min(len(colors), UNKNOWN_LABEL if annotation.kind == "color" else 256)
        palette[:count] = colors[:count]
        if names is None:
            names = [f"label {k}" if annotation.kind == "index" else f"colour {k}" for k in range(num_classes)]
        return cls(display, num_classes, palette, tuple(names))


def decode_labels(
    data: bytes, size: tuple[int, int], limits: Limits, *, original: tuple[int, int] | None = None
) -> LabelMap:
    """Decode an uploaded label map with :func:`crfasrnn.image.read_annotation`, sized (nearest) to ``size``.

    Accepted as ``crfasrnn refine --labels`` accepts them: a VOC-palette or grey PNG of integer labels (255 =
    unknown), or an RGB annotation in which each colour is a class and black is unknown.

    The label map must have the photo's size: the size it was uploaded at (``original``, (width, height), either
    orientation) or the size it is processed at (``size``). That is checked from the header, before any pixel is
    decoded; a larger map is then brought to ``size`` in its own mode (nearest neighbour) before it is read.

    Raises:
        ClientError: not an image, not a label map, no labelled pixel, or not the photo's size.
    """
    im, _ = _open(data, "label map", limits)
    height, width = size
    allowed: set[tuple[int, ...]] = {(width, height)}
    if original is not None:
        allowed |= {tuple(original), tuple(original)[::-1]}
    if im.size not in allowed:
        im.close()
        uploaded = (
            f" (uploaded at {original[0]}x{original[1]})"
            if original is not None and original != (width, height)
            else ""
        )
        raise ClientError(
            400,
            f"the label map is {im.size[0]}x{im.size[1]} but the photo is {width}x{height}"
            f"{uploaded}: the sizes must agree",
        )
    from ..image import read_annotation

    with _decoding(limits), tempfile.TemporaryDirectory(prefix="crfasrnn-serve-") as folder:
        path = Path(folder) / "labels.png"  # a name the server chooses; the client's file name is never used
        if im.size not in ((width, height), (height, width)):
            # keeps the mode and palette (Pillow sets its filter constants with setattr(): its annotations lack them)
            small = _load(im, "label map").resize((width, height), Image.NEAREST)  # type: ignore[attr-defined]
            small.save(path, format="PNG")
        else:
            path.write_bytes(data)
        im.close()
        try:
            annotation = read_annotation(path)
        except ValueError as exc:
            raise ClientError(
                400, f"the uploaded label map cannot be used: {str(exc).replace(str(path), 'upload')}"
            ) from None
    return LabelMap.from_annotation(annotation, size)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def label_png(labels: np.ndarray, palette: np.ndarray | None = None) -> str:
    """(H, W) labels in 0..255 as a base64 palette PNG (VOC colours unless ``palette`` (256, 3) is given)."""
    im = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    im.putpalette((voc_palette() if palette is None else palette).reshape(-1).tolist())
    return _png_base64(im)


def class_table(labels: np.ndarray, names, palette: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The classes present in ``labels``: label, name, colour (#rrggbb), pixel count and share, largest first.

    Example:
        >>> table = class_table(np.array([[0, 15], [15, 15]]), {0: "bg", 15: "person"})
        >>> [(r["name"], r["pixels"], r["share"]) for r in table]
        [('person', 3, 0.75), ('bg', 1, 0.25)]
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=256)
    palette = voc_palette() if palette is None else palette
    lookup = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    rows = []
    for index in np.flatnonzero(counts):
        label = int(index)
        name = lookup.get(label, "unknown" if label == UNKNOWN_LABEL else f"label {label}")
        r, g, b = (int(c) for c in palette[label])
        rows.append(
            {
                "label": label,
                "name": name,
                "color": f"#{r:02x}{g:02x}{b:02x}",
                "pixels": int(counts[label]),
                "share": float(counts[label] / labels.size),
            }
        )
    rows.sort(key=lambda row: (-row["pixels"], row["label"]))
    return rows


def _view(key: str, title: str, photo: np.ndarray, labels: np.ndarray, names, palette=None) -> dict[str, Any]:
    palette = voc_palette() if palette is None else palette
    return {
        "key": key,
        "title": title,
        "overlay_png": _png_base64(Image.fromarray(overlay(photo, labels, palette))),
        "labels_png": label_png(labels, palette),
        "classes": class_table(labels, names, palette),
    }


class Engine:
    """The server's state: the optional segmentation model (loaded once by the caller), limits and a compute lock.

    Args:
        model: a :class:`crfasrnn.CrfRnnNet` with weights (segmentation mode), or ``None`` (refinement mode only).
        class_names: names of the model's classes (default: the 21 PASCAL VOC classes).
        device: where the model and refinement compute.
        limits: upload and work limits.
        weights: metadata of the loaded weights to show the client (file name, sha256, ...).
        network_size: the network's input size (photos are resized to fit and padded to it; 500 as published).
    """

    def __init__(
        self,
        model: CrfRnnNet | None = None,
        *,
        class_names: list[str] | tuple[str, ...] | None = None,
        device: str | torch.device = "cpu",
        limits: Limits | None = None,
        weights: dict[str, Any] | None = None,
        network_size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
        self.limits = limits or Limits()
        self.model = None if model is None else model.to(self.device).eval()
        if class_names is None:
            from ..transforms import VOC_CLASSES

            class_names = VOC_CLASSES
        if model is not None and len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
        self.class_names = tuple(class_names)
        self.weights = dict(weights or {})
        if network_size is None:
            from ..transforms import NETWORK_SIZE

            network_size = NETWORK_SIZE
        self.network_size = int(network_size)
        self._lock = threading.Lock()
        # All computations run on this one thread: its allocations come from one malloc arena, which they reuse.
        # (Run on the thread pool's many threads, each freed tensor stays in its own thread's arena, and the
        # resident memory grows with every thread that computed once.)
        self.compute_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crfasrnn")
        self._sample: np.ndarray | None = None
        self._sample_labels: LabelMap | None = None

    @classmethod
    def from_weights(
        cls, path, *, device: str | torch.device = "cpu", limits: Limits | None = None, num_iterations: int = 10
    ) -> Engine:
        """Load a weights file once (any format :func:`crfasrnn.weights.load_model` reads) and serve its model."""
        from ..models import CrfRnnNet
        from ..weights import load_model

        model, info = load_model(path, num_iterations=num_iterations, device=device)
        if not isinstance(model, CrfRnnNet):  # an FCN-8s without its CRF (e.g. a checkpoint of training's first stage)
            raise ValueError(  # noqa: TRY004 (what a file holds: a bad file, not a bad argument)
                f"{path} holds an FCN-8s without a CRF-RNN layer: the demo serves a CRF-RNN network"
            )
        weights = {
            "file": Path(path).name,
            "format": info.format,
            "sha256": info.sha256,
            "num_classes": info.num_classes,
            "source": info.metadata.get("source_file") or Path(path).name,
        }
        if "paper" in info.metadata:
            weights["paper"] = info.metadata["paper"]
        logger.info("serving %s (%s, sha256 %s) on %s", path, info.format, info.sha256, device)
        return cls(model, class_names=info.classes, device=device, limits=limits, weights=weights)

    @property
    def mode(self) -> str:
        """``"segment"`` with a model, ``"refine"`` without."""
        return "segment" if self.model is not None else "refine"

    def info(self) -> dict[str, Any]:
        """What ``GET /api/info`` returns: mode, classes, limits, refinement parameters, weights metadata."""
        limits = self.limits
        return {
            "mode": self.mode,
            "modes": ["segment", "refine"] if self.model is not None else ["refine"],
            "classes": list(self.class_names),
            "device": str(self.device),
            "weights": self.weights,
            "limits": {
                "max_upload_bytes": limits.max_upload_bytes,
                "max_side": limits.max_side,
                "downscale": limits.downscale,
                "max_pixels": limits.pixel_limit,
                "work_side": limits.work_side,
            },
            "refine_parameters": refine_parameters(limits),
            "superpixels": {"available": superpixels_available(), "counts": list(SUPERPIXEL_COUNTS)},
        }

    def sample_photo(self) -> np.ndarray:
        """The bundled photograph (read once), at most ``work_side`` on its longer side."""
        if self._sample is None:
            photo = read_image(bundled_photo_path())
            target = _fit((photo.shape[1], photo.shape[0]), self.limits.work_side)
            if target != (photo.shape[1], photo.shape[0]):
                # Pillow sets its filter constants with setattr(): its annotations lack them
                photo = np.array(Image.fromarray(photo).resize(target, Image.BILINEAR))  # type: ignore[attr-defined]
            self._sample = photo
        return self._sample

    def sample_labels(self) -> LabelMap:
        """The bundled coarse annotation of the sample photo (``crfasrnn demo``'s), at the sample's size."""
        if self._sample_labels is None:
            from ..demo import DEMO_CLASSES
            from ..image import bundled_annotation_path, read_annotation

            annotation = read_annotation(bundled_annotation_path())
            self._sample_labels = LabelMap.from_annotation(
                annotation, self.sample_photo().shape[:2], names=DEMO_CLASSES
            )
        return self._sample_labels

    def segment(self, photo: np.ndarray, notes: list[str] | None = None) -> dict[str, Any]:
        """Segment a photo with the FCN and the full CRF-RNN; both results come back (views ``crf`` and ``fcn``)."""
        if self.model is None:
            raise ClientError(409, "no weights are loaded: start the server with --weights FILE to segment photos")
        from ..transforms import postprocess, prepare

        start = time.perf_counter()
        prepared = prepare(photo, max_size=self.network_size)
        x = prepared.tensor[None].to(self.device)
        with self._lock, torch.no_grad():
            compute_start = time.perf_counter()
            fcn = self.model.unary(x)
            crf = fcn if self.model.crf.num_iterations == 0 else self.model.crf(fcn, x.to(fcn.dtype))
            fcn_labels = postprocess(fcn[0], prepared.resized_size, prepared.original_size)
            crf_labels = postprocess(crf[0], prepared.resized_size, prepared.original_size)
            compute = time.perf_counter() - compute_start
        views = [
            _view("crf", "FCN-8s + CRF-RNN", photo, crf_labels, self.class_names),
            _view("fcn", "FCN-8s alone", photo, fcn_labels, self.class_names),
        ]
        return self._response("segment", photo, views, notes, start, compute)

    def refine(
        self,
        photo: np.ndarray,
        labels: LabelMap,
        params: RefineParams,
        notes: list[str] | None = None,
        *,
        source: str = "upload",
    ) -> dict[str, Any]:
        """Refine a label map of ``photo`` with :func:`crfasrnn.refine` (views ``refined`` and ``input``)."""
        start = time.perf_counter()
        if labels.labels.shape != photo.shape[:2]:
            raise ClientError(400, f"labels {labels.labels.shape} and photo {photo.shape[:2]} differ in size")
        refine = _refine_function()
        with self._lock:
            compute_start = time.perf_counter()
            try:
                refined = refine(
                    photo,
                    labels=labels.labels,
                    num_classes=labels.num_classes,
                    unknown_label=UNKNOWN_LABEL,
                    device=self.device,
                    **params.values,
                )
            except (ValueError, TypeError) as exc:
                raise ClientError(400, f"refinement failed: {exc}") from None
            compute = time.perf_counter() - compute_start
        views = [
            _view("refined", "refined by the CRF", photo, np.asarray(refined), labels.names, labels.palette),
            _view("input", "coarse input", photo, labels.labels, labels.names, labels.palette),
        ]
        result = self._response("refine", photo, views, notes, start, compute)
        result["parameters"] = dict(params.values)
        result["labels_source"] = source
        result["classes"] = list(labels.names)
        return result

    def _response(self, mode, photo, views, notes, start, compute) -> dict[str, Any]:
        return {
            "mode": mode,
            "width": int(photo.shape[1]),
            "height": int(photo.shape[0]),
            "photo_png": _png_base64(Image.fromarray(photo)),
            "views": views,
            "notes": list(notes or []),
            "compute_seconds": round(compute, 4),
            "seconds": round(time.perf_counter() - start, 4),
        }
