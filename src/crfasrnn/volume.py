"""Dense-CRF refinement of 3-D volumes: reading and writing ``.npy`` and NIfTI volumes, and :func:`refine_volume`.

What :func:`crfasrnn.refine.refine` does for a photo, this module does for a volume (CT, MRI, microscopy stacks): a
rough label volume or class probabilities are sharpened to the edges of the intensities with a fully connected CRF,
the engine's :class:`~crfasrnn.engine.DenseCRF` with a spatial kernel (positions over ``theta_gamma``) and a bilateral
kernel (positions over ``theta_alpha``, intensities over ``theta_beta``), both with a Potts model. Distances are in the
units of the voxel spacing (millimetres for NIfTI), intensities in the volume's own units.

Formats:

- ``.npy``: a volume is (D, H, W) or (D, H, W, channels) (several modalities on the last axis), labels (D, H, W)
  integers, probabilities (C, D, H, W) floats; the spacing is 1 unless given.
- NIfTI (``.nii``, ``.nii.gz``), read with nibabel (the optional ``nifti`` extra: ``pip install 'crfasrnn[nifti]'``,
  imported only when a NIfTI file is read or written): the data array's axes as nibabel gives them, (X, Y, Z) or
  (X, Y, Z, channels); probabilities (X, Y, Z, classes); the spacing from ``header.get_zooms()[:3]``. Written labels
  keep the input's affine and header (with the label dtype, no intensity scaling and the ``label`` intent).

Normalisation: the kernels are normalised symmetrically (``√n ⊙ K (√n ⊙ Q)``, pydensecrf's default
``NORMALIZE_SYMMETRIC``), as volume users coming from pydensecrf / SimpleCRF expect; the 2-D :func:`~crfasrnn.refine.
refine` keeps CRF-RNN's per-pixel ``"after"`` normalisation. ``normalization=`` chooses another.

The unary is the 2-D path's: from labels pydensecrf's ``unary_from_labels`` (``gt_prob`` on a voxel's label, the rest
spread evenly over the others, uniform where the label is unknown: :func:`crfasrnn.refine.unary_from_labels`, applied
slice by slice); from probabilities ``log`` of the probabilities clipped at 1e-5.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import Normalization, per_axis
from .errors import InputTypeError, MissingDependencyError
from .files import OutputError, atomic_write, check_output
from .refine import PROB_CLIP, SUM_TOLERANCE, check_parameters, infer_num_classes, unary_from_labels

__all__ = [
    "MAX_CHANNELS",
    "NIFTI_SUFFIXES",
    "Volume",
    "VolumeRefinement",
    "default_output",
    "label_dtype",
    "read_labels",
    "read_probabilities",
    "read_volume",
    "refine_volume",
    "refine_volume_file",
    "save_labels",
    "volume_format",
]

logger = logging.getLogger(__name__)

#: File name endings of NIfTI images (compared case-insensitively).
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: The most intensity channels a volume may have on its last axis (each is one more dimension of the lattice).
MAX_CHANNELS = 16
_NIFTI_HINT = "pip install 'crfasrnn[nifti]'"


def volume_format(path: str | os.PathLike) -> str | None:
    """The volume format a file name announces: ``"npy"``, ``"nifti"`` or ``None`` (not a volume's name).

    Args:
        path: a file name; only its ending is looked at.

    Returns:
        ``"npy"`` for ``.npy``, ``"nifti"`` for ``.nii`` and ``.nii.gz`` (any case), else ``None``.

    Example:
        >>> volume_format("brain.nii.gz"), volume_format("ct.NPY"), volume_format("photo.png")
        ('nifti', 'npy', None)
    """
    name = Path(path).name.lower()
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return None


def _stem(path: Path) -> str:
    """The name without its volume ending (``.nii.gz`` counts as one)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def label_dtype(num_classes: int) -> np.dtype:
    """The dtype labels of ``num_classes`` classes are stored in: uint8 if they fit (at most 256 classes), else int32.

    Args:
        num_classes: the class count C (labels 0..C-1).

    Returns:
        ``np.dtype("uint8")`` or ``np.dtype("int32")``.

    Example:
        >>> label_dtype(2), label_dtype(300)
        (dtype('uint8'), dtype('int32'))
    """
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int32)


@dataclass
class Volume:
    """An array read from a volume file, with what the file says about it.

    Attributes:
        data: the array in this module's layout: a volume (D, H, W) or (D, H, W, G) float32, labels (D, H, W) int64,
            probabilities (C, D, H, W) float32 (NIfTI's (X, Y, Z, C) moved to the front).
        path: the file it came from (None for arrays given directly).
        spacing: the voxel spacing from a NIfTI header (``get_zooms()[:3]``), None for ``.npy``.
        image: the nibabel image of a NIfTI file (its header and affine), None for ``.npy``.
        classes_first: whether the first axis is the classes (probabilities), not the first spatial axis.
    """

    data: np.ndarray
    path: Path | None = None
    spacing: tuple[float, ...] | None = None
    image: Any = None
    classes_first: bool = False

    @property
    def format(self) -> str:
        """``"nifti"`` or ``"npy"``."""
        return "nifti" if self.image is not None else "npy"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The three spatial sizes (D, H, W), whatever the array's layout."""
        return tuple(self.data.shape[1:4]) if self.classes_first else tuple(self.data.shape[:3])


# --- reading ---------------------------------------------------------------------------------------------------------


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise MissingDependencyError(
            f"reading and writing NIfTI files (.nii, .nii.gz) needs nibabel: {_NIFTI_HINT}"
        ) from None
    return nibabel


def _load(path: Path, what: str) -> tuple[np.ndarray, Any]:
    """The raw array of a .npy or NIfTI file and the nibabel image (None for .npy); one ValueError if unreadable."""
    kind = volume_format(path)
    if kind is None:
        raise ValueError(f"{what} {path} is neither a .npy array nor a NIfTI image (.nii, .nii.gz)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if kind == "npy":
        try:
            with open(path, "rb") as f:
                magic = f.read(8)
            if not magic.startswith(b"\x93NUMPY"):
                raise ValueError("not a .npy array file")
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise InputTypeError(
                    f"{what} {path} has dtype object (pickled Python objects): a volume must be a numeric array"
                ) from None
            raise ValueError(f"cannot read {what} {path}: {exc}") from None
        except (OSError, EOFError) as exc:
            raise ValueError(f"cannot read {what} {path}: {exc}") from None
        return array, None
    nib = _nibabel()
    notes = _Notes()
    nibabel_logger = logging.getLogger("nibabel.global")
    nibabel_logger.addFilter(notes)  # its header repairs ("setting 0 dims to 1") would be a second line on stderr
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj) if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)) else None
    # nibabel's own errors, gzip / zlib / struct errors of damaged or truncated files: all one message, whatever type
    except Exception as exc:  # noqa: BLE001
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"cannot read {what} {path}: {text}") from None
    finally:
        nibabel_logger.removeFilter(notes)
    if array is None:
        raise ValueError(f"cannot read {what} {path}: it is a {type(image).__name__}, not a NIfTI image")
    for note in notes.messages:
        logger.info("%s: nibabel: %s", path, note)
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI keeps vector components on axis 5, after a time axis of 1
        array = array[:, :, :, 0]
    return array, image


class _Notes(logging.Filter):
    """Keeps the messages of a logger (nibabel's header checks) instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


def _header_spacing(path: Path, image: Any) -> tuple[float, ...]:
    """The voxel spacing a NIfTI header states: ``get_zooms()[:3]``, but as written in the file.

    nibabel repairs a zero pixdim to 1 and a negative one to its absolute value when it loads a header; such a spacing
    is unknown, not 1 mm, so the raw ``pixdim[1:4]`` is read back from the file's first bytes (NIfTI-1: float32 at
    byte 80, NIfTI-2: float64 at byte 112, in the byte order that makes ``sizeof_hdr`` 348 or 540).
    """
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as f:
            head = f.read(540)
        for order in "<>":
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size == 348 and len(head) >= 92:
                return tuple(float(v) for v in struct.unpack(f"{order}3f", head[80:92]))
            if size == 540 and len(head) >= 136:
                return tuple(float(v) for v in struct.unpack(f"{order}3d", head[112:136]))
    except (OSError, EOFError, struct.error):
        pass
    return zooms


def _check_dtype(array: np.ndarray, what: str, allowed: str) -> None:
    """Refuse arrays whose dtype cannot be ``allowed`` (``"numeric"``, ``"integer"`` or ``"floating"``)."""
    dtype = array.dtype
    where = f"{what} (shape {array.shape})"
    if dtype.hasobject or dtype.kind in "OVSUMm":
        raise InputTypeError(f"{where} has dtype {dtype}: a numeric array is needed")
    if dtype.kind == "c":
        raise InputTypeError(f"{where} is complex ({dtype}): a real-valued array is needed")
    if allowed == "integer" and dtype.kind not in "iu":
        hint = " (round and convert them, e.g. with .astype(np.int32))" if dtype.kind == "f" else ""
        raise InputTypeError(f"{where} has dtype {dtype}: labels must be integers{hint}")
    if allowed == "floating" and dtype.kind != "f":
        raise InputTypeError(f"{where} has dtype {dtype}: probabilities must be floating point")


def _native(array: np.ndarray, dtype=None) -> np.ndarray:
    """A C-contiguous array in this machine's byte order (torch refuses big-endian arrays), optionally cast."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))


def _check_volume_array(array: np.ndarray, what: str) -> np.ndarray:
    """A (D, H, W) or (D, H, W, G) numeric, finite volume as float32 (the checks shared by files and arrays)."""
    if array.ndim not in (3, 4):
        raise ValueError(f"{what} must be (D, H, W) or (D, H, W, channels), got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{what} is empty (shape {array.shape})")
    if array.ndim == 4 and array.shape[3] > MAX_CHANNELS:
        raise ValueError(
            f"{what} of shape {array.shape} has {array.shape[3]} channels on its last axis, more than "
            f"{MAX_CHANNELS}: a volume is (D, H, W) or (D, H, W, channels)"
        )
    _check_dtype(array, what, "numeric")
    out = _native(array, np.float32)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise ValueError(
            f"{what} of shape {array.shape} contains NaN or Inf ({bad} values"
            f"{', after conversion to float32' if np.isfinite(array).all() else ''})"
        )
    return out


def read_volume(path: str | os.PathLike) -> Volume:
    """Read an intensity volume: a (D, H, W) / (D, H, W, channels) ``.npy`` array or a 3-D / 4-D NIfTI image.

    Args:
        path: a ``.npy``, ``.nii`` or ``.nii.gz`` file.

    Returns:
        A :class:`Volume` with float32 data and, for NIfTI, the header spacing and the image.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, another rank (a 2-D NIfTI, a 2-D array), NaN or Inf.
        TypeError: a non-numeric dtype (complex, object).
        RuntimeError: a NIfTI file without nibabel installed.
    """
    path = Path(path)
    array, image = _load(path, "volume")
    what = f"volume {path}"
    if image is not None and array.ndim < 3:
        raise ValueError(
            f"{what} is a {array.ndim}-D NIfTI image (shape {array.shape}): a volume needs three spatial "
            "axes (refine 2-D images as PNG)"
        )
    if image is None and array.ndim == 2:
        raise ValueError(
            f"{what} is a 2-D array (shape {array.shape}): .npy volumes are (D, H, W) or (D, H, W, "
            "channels) (refine 2-D images as PNG)"
        )
    data = _check_volume_array(array, what)
    spacing = None if image is None else _header_spacing(path, image)
    return Volume(data, path, spacing, image)


def read_labels(path: str | os.PathLike) -> Volume:
    """Read a label volume: a (D, H, W) integer ``.npy`` array or a 3-D integer NIfTI image.

    Args:
        path: a ``.npy``, ``.nii`` or ``.nii.gz`` file.

    Returns:
        A :class:`Volume` with int64 (D, H, W) data.

    Raises:
        FileNotFoundError, ValueError, TypeError, RuntimeError: as :func:`read_volume`; float labels are a TypeError.
    """
    path = Path(path)
    array, image = _load(path, "labels")
    while image is not None and array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    what = f"labels {path}"
    if array.ndim != 3:
        layout = "(X, Y, Z)" if image is not None else "(D, H, W)"
        raise ValueError(f"{what} must be a {layout} label volume, got shape {array.shape}")
    _check_dtype(array, what, "integer")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} holds label values beyond the int64 range")
    spacing = None if image is None else tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(_native(array, np.int64), path, spacing, image)


def read_probabilities(path: str | os.PathLike) -> Volume:
    """Read class probabilities: a (C, D, H, W) ``.npy`` array or a NIfTI image whose last axis is the classes.

    Args:
        path: a ``.npy``, ``.nii`` or ``.nii.gz`` file; NIfTI data (X, Y, Z, C) is moved to (C, X, Y, Z).

    Returns:
        A :class:`Volume` with float32 (C, D, H, W) data (their sums are checked by :func:`refine_volume`).

    Raises:
        FileNotFoundError, ValueError, TypeError, RuntimeError: as :func:`read_volume`; NaN, Inf or negative values
        are a ValueError, integer dtypes a TypeError.
    """
    path = Path(path)
    array, image = _load(path, "probabilities")
    what = f"probabilities {path}"
    if array.ndim != 4:
        layout = "(X, Y, Z, classes)" if image is not None else "(C, D, H, W)"
        raise ValueError(f"{what} must be a {layout} array, got shape {array.shape}")
    _check_dtype(array, what, "floating")
    data = _native(np.moveaxis(array, 3, 0) if image is not None else array, np.float32)
    _check_probs(data, what)
    spacing = None if image is None else tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(data, path, spacing, image, classes_first=True)


def _check_probs(probs: np.ndarray, what: str) -> None:
    if 0 in probs.shape:
        raise ValueError(f"{what} is empty (shape {probs.shape})")
    finite = np.isfinite(probs)
    if not finite.all():
        raise ValueError(f"{what} of shape {probs.shape} contain NaN or Inf ({int((~finite).sum())} values)")
    if (probs < 0).any():
        raise ValueError(f"{what} of shape {probs.shape} contain negative values (minimum {float(probs.min()):.4g})")


# --- the CRF ---------------------------------------------------------------------------------------------------------


def _unary_from_probs(probs: np.ndarray, normalize: bool) -> torch.Tensor:
    """(1, C, D, H, W) ``log`` of clipped probabilities, normalised or checked to sum to 1 (the 2-D path's rules)."""
    _check_probs(probs, "probabilities")
    sums = probs.sum(axis=0, keepdims=True, dtype=np.float64)
    if normalize:
        if (sums <= 0).any():
            raise ValueError(
                f"probabilities of shape {probs.shape} have voxels whose probabilities are all 0: cannot normalise them"
            )
        probs = (probs / sums).astype(np.float32)
    else:
        worst = float(np.abs(sums - 1).max())
        if worst > SUM_TOLERANCE:
            raise ValueError(
                f"probabilities of shape {probs.shape} do not sum to 1 over the class axis (off by up "
                f"to {worst:.3g}); pass normalize=True (--normalize) to rescale them"
            )
    return torch.from_numpy(np.ascontiguousarray(probs)).clamp_min(PROB_CLIP).log()[None]


class _SourceError(ValueError):
    """A ValueError about the labels or probabilities (the file reader prefixes the file's name)."""


def _unary(
    volume_shape: tuple[int, ...],
    labels: Any,
    probs: Any,
    *,
    num_classes: int | None,
    gt_prob: float,
    unknown_label: int | None,
    normalize: bool,
) -> torch.Tensor:
    """The (1, C, D, H, W) unary scores of labels or probabilities, checked against the volume's shape."""
    shape = tuple(volume_shape[:3])
    if probs is not None:
        probs = _numpy("probs", probs)
        if probs.ndim != 4 or tuple(probs.shape[1:]) != shape:
            raise ValueError(
                f"probabilities of shape {probs.shape} do not match the volume of shape "
                f"{tuple(volume_shape)}: they must be (C, {', '.join(map(str, shape))})"
            )
        _check_dtype(probs, "probabilities", "floating")
        unary = _unary_from_probs(_native(probs, np.float32), normalize)
        if num_classes is not None and num_classes != unary.shape[1]:
            raise ValueError(
                f"num_classes={num_classes} but the probabilities have {unary.shape[1]} classes (shape {probs.shape})"
            )
        return unary
    labels = _numpy("labels", labels)
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the volume of shape {tuple(volume_shape)}")
    _check_dtype(labels, "labels", "integer")
    labels = torch.from_numpy(_native(labels, np.int64))
    if num_classes is None:
        num_classes = infer_num_classes(labels, unknown_label)
    # pydensecrf's unary, voxel by voxel: the 2-D function over the D slices as a batch, (D, C, H, W) -> (C, D, H, W)
    unary = unary_from_labels(labels, num_classes, gt_prob=gt_prob, unknown_label=unknown_label)
    return unary.transpose(0, 1).contiguous()[None]


def refine_volume(
    volume: Any,
    labels: Any = None,
    probs: Any = None,
    spacing: float | Sequence[float] | None = None,
    *,
    num_classes: int | None = None,
    num_iterations: int = 10,
    theta_alpha: float | Sequence[float] = 80.0,
    theta_beta: float | Sequence[float] = 13.0,
    theta_gamma: float | Sequence[float] = 3.0,
    spatial_weight: float = 3.0,
    bilateral_weight: float = 10.0,
    gt_prob: float = 0.7,
    unknown_label: int | None = None,
    normalize: bool = False,
    normalization: Normalization = "symmetric",
    device: str | torch.device | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Refine a rough label volume or class probabilities of a volume with a fully connected CRF (Potts model).

    Give exactly one of ``labels`` and ``probs``. The CRF has a spatial kernel (positions over ``theta_gamma``, weight
    ``spatial_weight``) and a bilateral kernel (positions over ``theta_alpha`` and intensities over ``theta_beta``,
    weight ``bilateral_weight``), normalised as ``normalization`` says (pydensecrf's symmetric one by default). The
    kernels depend only on intensity differences: each channel's minimum is subtracted first, which keeps the
    lattice's features small.

    Args:
        volume: (D, H, W) or (D, H, W, G) intensities, numpy or torch (G channels: several modalities).
        labels: (D, H, W) integer labels in ``0..C-1``, plus ``unknown_label``.
        probs: (C, D, H, W) class probabilities (finite, >= 0, summing to 1 over C unless ``normalize``).
        spacing: the voxel size along each array axis (one number or three); default 1. Bandwidths are in its units.
        num_classes: C for ``labels`` (default: largest known label + 1); must equal the class axis of ``probs``.
        num_iterations: mean-field iterations (0: the unary's argmax).
        theta_alpha: positional bandwidth of the bilateral kernel: one number or one per axis.
        theta_beta: intensity bandwidth of the bilateral kernel: one number or one per channel.
        theta_gamma: bandwidth of the spatial kernel: one number or one per axis.
        spatial_weight: Potts weight of the spatial kernel.
        bilateral_weight: Potts weight of the bilateral kernel.
        gt_prob: confidence in ``labels``, in (0, 1).
        unknown_label: the label value of voxels with no information (e.g. 255), or None.
        normalize: rescale ``probs`` to sum to 1 per voxel instead of rejecting those that do not.
        normalization: the kernels' normalisation: ``"symmetric"``, ``"after"`` (CRF-RNN's), ``"before"``, ``"none"``.
        device: where to compute (default: the CPU).
        backend: lattice back end (``"auto"``, ``"torch"``, ``"numba"``).

    Returns:
        (D, H, W) numpy labels, uint8 if the classes fit (at most 256), else int32.

    Raises:
        ValueError: mismatched shapes, NaN or Inf, probabilities that are negative or do not sum to 1, labels beyond
            the class count, bad parameters.
        TypeError: inputs of the wrong kind or dtype.

    Example:
        >>> z, y, x = np.mgrid[:8, :12, :12]
        >>> truth = (z - 4) ** 2 + (y - 6) ** 2 + (x - 6) ** 2 < 16               # a ball of radius 4
        >>> volume = np.where(truth, 200.0, 20.0)
        >>> rough = ((z - 4) ** 2 + (y - 6) ** 2 + (x - 7) ** 2 < 16).astype(np.uint8)  # shifted by one voxel
        >>> refined = refine_volume(volume, labels=rough, gt_prob=0.6)
        >>> refined.dtype, bool((refined == truth).all())
        (dtype('uint8'), True)
    """
    if (probs is None) == (labels is None):
        raise ValueError("give exactly one of labels and probs")
    check_parameters(
        num_iterations=num_iterations,
        spatial_weight=spatial_weight,
        bilateral_weight=bilateral_weight,
        gt_prob=gt_prob,
        num_classes=num_classes,
    )
    volume = _check_volume_array(_numpy("volume", volume), "volume")
    shape = volume.shape[:3]
    channels = volume.shape[3] if volume.ndim == 4 else 1
    spacing = (1.0, 1.0, 1.0) if spacing is None else per_axis("spacing", spacing, 3)
    theta_gamma = per_axis("theta_gamma", theta_gamma, 3)
    theta_alpha = per_axis("theta_alpha", theta_alpha, 3)
    theta_beta = per_axis("theta_beta", theta_beta, channels)
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this torch has no CUDA device available")

    try:
        unary = _unary(
            volume.shape,
            labels,
            probs,
            num_classes=num_classes,
            gt_prob=gt_prob,
            unknown_label=unknown_label,
            normalize=normalize,
        )
    except ValueError as exc:
        raise _SourceError(str(exc)) from None
    num_classes = unary.shape[1]

    from .engine import DenseCRF, GaussianKernel

    guide = torch.from_numpy(volume.reshape(*shape, channels)).permute(3, 0, 1, 2)[None]
    guide = guide - guide.amin(dim=(2, 3, 4), keepdim=True)
    crf = DenseCRF(
        num_classes,
        [
            GaussianKernel(positions=theta_gamma, weight=float(spatial_weight), normalization=normalization),
            GaussianKernel(
                positions=theta_alpha, guide=theta_beta, weight=float(bilateral_weight), normalization=normalization
            ),
        ],
        num_iterations=int(num_iterations),
        unary_kind="scores",
        learnable=False,
        backend=backend,
        compact=True,
    ).to(device)  # compact lattices: volumes are large
    logger.debug(
        "refining a %s volume (%d channel(s), spacing %s) with %d classes",
        "x".join(map(str, shape)),
        channels,
        spacing,
        num_classes,
    )
    with torch.no_grad():
        scores = crf(unary.to(device), guide.contiguous().to(device), spacing=spacing)
    # numpy's argmax over the leading class axis is several times faster than torch's on the CPU
    return np.argmax(scores[0].cpu().numpy(), axis=0).astype(label_dtype(num_classes))


def _numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise InputTypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")


# --- writing ---------------------------------------------------------------------------------------------------------


def _check_target(output: Path, kind: str, inputs: Sequence[Path]) -> Path:
    """The output's ending must be the input's format; an existing target must be a replaceable regular file."""
    if volume_format(output) != kind:
        wanted = ".npy" if kind == "npy" else ".nii or .nii.gz"
        raise OutputError(f"output {output} must end in {wanted}: refined volumes are written in the input's format")
    return check_output(output, inputs=inputs)


def save_labels(
    labels: np.ndarray, path: str | os.PathLike, like: Volume | None = None, *, num_classes: int | None = None
) -> None:
    """Write a label volume atomically (:func:`crfasrnn.files.atomic_write`), as ``.npy`` or NIfTI by its name.

    Args:
        labels: (D, H, W) integer labels in 0..C-1, stored as :func:`label_dtype` of C.
        path: ``.npy``, ``.nii`` or ``.nii.gz`` file.
        like: for NIfTI, the volume read from NIfTI whose affine and header the labels keep (required).
        num_classes: C (default: the largest label + 1).

    Raises:
        ValueError: another ending, or a NIfTI output without a NIfTI ``like``.
    """
    path = Path(path)
    kind = volume_format(path)
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    dtype = label_dtype(num_classes)
    labels = np.ascontiguousarray(labels.astype(dtype, copy=False))
    if kind == "npy":

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
                np.save(f, labels, allow_pickle=False)

        atomic_write(path, write)
        return
    if kind != "nifti":
        raise OutputError(f"output {path} must end in .npy, .nii or .nii.gz")
    if like is None or like.image is None:
        raise ValueError(f"writing {path} as NIfTI needs the NIfTI volume whose affine and header it keeps")
    _nibabel()
    reference = like.image
    image = type(reference)(labels, reference.affine, reference.header.copy())
    image.set_data_dtype(dtype)
    header = image.header
    header.set_slope_inter(1.0, 0.0)  # labels are stored as they are, never scaled
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, float(labels.max()) if labels.size else 0
    data = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)

    def write_bytes(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write_bytes)


# --- files in, file out ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeRefinement:
    """What :func:`refine_volume_file` did.

    Attributes:
        output: the file written.
        shape: the volume's spatial shape.
        spacing: the voxel spacing used.
        num_classes: the class count.
        changed: labelled voxels whose label changed (labels input; 0 for probabilities).
        labelled: voxels with a known label (labels input; 0 for probabilities).
        unknown: voxels with the unknown label (labels input; 0 for probabilities).
        seconds: time spent in the CRF.
    """

    output: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    num_classes: int
    changed: int = 0
    labelled: int = 0
    unknown: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the command line."""
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        line = (
            f"wrote {self.output} ({'x'.join(map(str, self.shape))} voxels, spacing {spacing}, "
            f"{self.num_classes} classes, {self.seconds:.2f} s)"
        )
        if self.labelled or self.unknown:
            line += (
                f": changed the label of {self.changed} of {self.labelled} labelled voxels and labelled "
                f"{self.unknown} unknown voxels"
            )
        return line


def default_output(volume: str | os.PathLike) -> Path:
    """``<name>_refined.npy`` / ``<name>_refined.nii.gz`` in the current folder for a volume ``<name>.<ending>``.

    Example:
        >>> str(default_output("scans/brain.nii.gz")), str(default_output("ct.npy"))
        ('brain_refined.nii.gz', 'ct_refined.npy')
    """
    path = Path(volume)
    ending = path.name[len(_stem(path)) :]
    return Path(f"{_stem(path)}_refined{ending}")


def refine_volume_file(
    volume: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    labels: str | os.PathLike | None = None,
    probs: str | os.PathLike | None = None,
    spacing: Sequence[float] | None = None,
    **options: Any,
) -> VolumeRefinement:
    """Read a volume and its labels or probabilities, refine them (:func:`refine_volume`), write the labels.

    Every input is read and checked, and the output's name and target too, before anything is written; the labels
    are written atomically, in the volume's format (a NIfTI keeps its affine and header).

    Args:
        volume: the intensity volume (``.npy``, ``.nii``, ``.nii.gz``).
        output: the label volume to write, or a folder (default: ``<name>_refined.<ending>`` here).
        labels: the rough label volume (any of the formats, the volume's spatial shape).
        probs: the class probabilities ((C, D, H, W) ``.npy`` or (X, Y, Z, C) NIfTI).
        spacing: the voxel size along the array axes; overrides a NIfTI header's (default: the header's, else 1).
        **options: :func:`refine_volume`'s keyword arguments (``num_iterations``, ``theta_gamma``, ``gt_prob``, ...).

    Returns:
        A :class:`VolumeRefinement` (the output, the shape, the spacing, the counts of changed labels).

    Raises:
        FileNotFoundError, ValueError, TypeError, RuntimeError: see :func:`read_volume` and :func:`refine_volume`.
    """
    source_file = labels if labels is not None else probs
    if source_file is None or (labels is not None and probs is not None):
        raise ValueError("give exactly one of labels and probs")
    volume_path = Path(volume)
    source = Path(source_file)
    kind = volume_format(volume_path)
    if kind is None:
        raise ValueError(f"volume {volume_path} is neither a .npy array nor a NIfTI image (.nii, .nii.gz)")
    if spacing is not None:
        spacing = per_axis("spacing", spacing, 3, hint=" (--spacing A B C, in array-axis order)")
    out = Path(output) if output is not None else default_output(volume_path)
    if out.is_dir():
        out = out / f"{_stem(volume_path)}{volume_path.name[len(_stem(volume_path)) :]}"
    _check_target(out, kind, (volume_path, source))

    vol = read_volume(volume_path)
    given = read_labels(source) if labels is not None else read_probabilities(source)
    if given.spatial_shape != vol.data.shape[:3]:
        what = "labels" if labels is not None else "probabilities"
        raise ValueError(
            f"{what} {source} of shape {given.data.shape if given.image is None else given.image.shape} "
            f"do not match the volume {volume_path} of shape "
            f"{vol.data.shape if vol.image is None else vol.image.shape}: the spatial shapes "
            f"{given.spatial_shape} and {vol.data.shape[:3]} differ"
        )
    if (
        vol.image is not None
        and given.image is not None
        and not np.allclose(vol.image.affine, given.image.affine, atol=1e-3)
    ):
        logger.warning("%s and %s have different affines: they are combined voxel by voxel", volume_path, source)
    if spacing is None and vol.spacing is not None:
        if not all(math.isfinite(v) and v > 0 for v in vol.spacing):
            raise ValueError(
                f"volume {volume_path} has the voxel spacing {vol.spacing} in its header (pixdim): a "
                "spacing must be finite and > 0; give the right one with --spacing A B C"
            )
        spacing = vol.spacing
    spacing = spacing or (1.0, 1.0, 1.0)

    unknown_label = options.get("unknown_label")
    num_classes = options.pop("num_classes", None)
    start = time.perf_counter()
    try:
        if labels is not None:
            if num_classes is None:
                num_classes = infer_num_classes(torch.from_numpy(given.data), unknown_label)
            refined = refine_volume(vol.data, labels=given.data, spacing=spacing, num_classes=num_classes, **options)
        else:
            num_classes = given.data.shape[0] if num_classes is None else num_classes
            refined = refine_volume(vol.data, probs=given.data, spacing=spacing, num_classes=num_classes, **options)
    except _SourceError as exc:
        raise ValueError(f"{source}: {exc}") from None
    seconds = time.perf_counter() - start
    save_labels(refined, out, like=vol, num_classes=num_classes)
    counts = {}
    if labels is not None:
        coarse = given.data
        known = coarse != unknown_label if unknown_label is not None else coarse >= 0
        counts = {
            "changed": int((refined[known] != coarse[known]).sum()),
            "labelled": int(known.sum()),
            "unknown": int((~known).sum()),
        }
    return VolumeRefinement(out, tuple(vol.data.shape[:3]), tuple(spacing), int(num_classes), seconds=seconds, **counts)
