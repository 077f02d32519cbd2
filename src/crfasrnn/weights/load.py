"""The one loader: any weights file to our state_dict, checked, and the network it describes.

:func:`read_weights` recognises every kind of file from its bytes and contents, and converts it to
:class:`~crfasrnn.models.CrfRnnNet`'s names and conventions (CPU float32 tensors):

* Caffe ``.caffemodel`` (format ``caffe-v1`` / ``caffe-v2``): neither a zip, a pickle nor safetensors; read by
  :mod:`~crfasrnn.weights.caffe`, renamed by :data:`~crfasrnn.weights.convert.CAFFE_LAYERS`.
* the PyTorch port's ``.pth`` (``port-pth``): a state_dict with ``crfrnn.*`` keys
  (:data:`~crfasrnn.weights.convert.PORT_KEYS`; the compatibility matrix changes sign).
* the Keras port's ``.h5`` (``keras-h5``): HDF5 (its 8-byte signature), read by :mod:`~crfasrnn.weights.keras` with
  h5py (the ``keras`` extra), renamed by :data:`~crfasrnn.weights.convert.KERAS_LAYERS`, kernels permuted from
  channels-last (Caffe's sign: nothing changes sign).
* ours (:mod:`~crfasrnn.weights.format`): safetensors (``safetensors``: an 8-byte header length, then ``{``), or
  ``torch.save`` of ``{"state_dict": ..., "metadata": ...}`` or of a plain state_dict in our names (``torch``).
* a ``crfasrnn train`` checkpoint (``checkpoint``): ``{"model": state_dict, "args": options, "class_names": ...}``
  (:mod:`crfasrnn.checkpoint`); its options give the width, its class names the classes.
* a torchvision VGG-16 state_dict (``torchvision-vgg16``: ``features.N`` / ``classifier.N`` keys): a backbone
  without class layers, read only with ``allow_backbone=True`` (to start training from it).

Torch files are read with ``torch.load(weights_only=True)``: no code runs from a file. The metadata (ours, or what
a checkpoint's options say) is merged over :func:`~crfasrnn.weights.format.default_metadata`; the ``width`` is the
recorded one, else ``conv1_1``'s channels / 64 (:func:`~crfasrnn.weights.format.width_of`): the one place it is
inferred.

The state_dict is in the layout of the network the file holds: a CRF-RNN's in CrfRnnNet's composed layout
(``backbone.conv1_1.weight`` …, ``crf.*``: the published formats and our older flat-keyed files through
:func:`~crfasrnn.weights.convert.compose_keys`), an FCN-8s's in FCN8s's flat one. :func:`state_dict_for` puts a
state_dict in a given model's layout (the same mapping, or a CRF-RNN's ``backbone.*`` for a plain FCN8s); the
loaders and :mod:`crfasrnn.initialise` use it.

:func:`load_model` builds the network a file holds (:func:`network_for`): a CrfRnnNet when it has ``crf.*`` tensors
or is a published CRF-RNN format, an FCN8s when it holds FCN-8s tensors only. :func:`load_weights` loads into a given
model. Both validate every tensor (names, shapes, class count, finiteness) before anything is copied, so a bad file
leaves the model untouched; errors are :class:`~crfasrnn.weights.errors.WeightsError` (a ``ValueError``) naming the
file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models import CrfRnnNet, FCN8s
from .caffe import read_caffemodel
from .convert import (
    BACKBONE_PREFIX,
    PORT_KEYS,
    compose_keys,
    convert_caffe_blobs,
    convert_keras_weights,
    convert_port_state_dict,
    convert_torchvision_vgg16,
    fcn_key,
    is_torchvision_vgg16,
    squeeze_leading,
)
from .errors import WeightsError
from .format import (
    WeightsInfo,
    architecture_of,
    default_metadata,
    file_sha256,
    higher_order_options,
    metadata_width,
    save_weights,
    width_of,
)
from .hub import LICENCE, resolve
from .keras import read_keras_h5

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHTS_HELP",
    "PUBLISHED_FORMATS",
    "detect_format",
    "fetch_weights",
    "read_weights",
    "network_for",
    "state_dict_for",
    "load_weights",
    "load_model",
    "convert_weights",
]

#: Where the published weights can be obtained (shown when none are given).
WEIGHTS_HELP = (
    "the published CRF-RNN weights are registered by name (crfasrnn weights list): voc-coco (the PyTorch port's "
    "crfasrnn_weights.pth), voc-coco-caffe (TVG_CRFRNN_COCO_VOC.caffemodel) and voc-coco-keras "
    "(crfrnn_keras_model.h5); pass a name, a URL or a file with --weights or CRFASRNN_WEIGHTS; a name or URL is "
    "downloaded once into torch.hub's cache"
)

#: The formats of the published CRF-RNN files: always a CrfRnnNet.
PUBLISHED_FORMATS = ("caffe-v1", "caffe-v2", "port-pth", "keras-h5")


def _readable(path: Path) -> None:
    """The structural check of a downloaded file without a published checksum: it reads as weights."""
    read_weights(path, allow_backbone=True)


def fetch_weights(spec: str | os.PathLike, *, url: str | None = None) -> Path:
    """The local file a weights argument (a path, a URL, a published name) stands for, downloaded and verified into
    the cache where needed (:func:`crfasrnn.weights.hub.resolve`); ``url``: a mirror of a published name."""
    return resolve(spec, url=url, validate=_readable)


def detect_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch"`` (zip or pickle, the port's ``.pth`` included), ``"hdf5"`` (the Keras port's
    ``.h5``) or ``"caffe"``, from the bytes.

    Raises:
        FileNotFoundError: no such file.
        WeightsError: an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise WeightsError(f"{path} is empty")
    if head[:8] == b"\x89HDF\r\n\x1a\n":  # HDF5's signature (at offset 0: h5py and Keras write no user block)
        return "hdf5"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "caffe"


def _checkpoint_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``crfasrnn train`` checkpoint says about its model: the width and stage of its options, class names."""
    args = checkpoint.get("args")
    args = args if isinstance(args, Mapping) else {}
    metadata = {key: args[key] for key in ("width", "stage") if key in args}
    names = checkpoint.get("class_names")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        metadata["classes"] = list(names)
    return metadata


def _torch_contents(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The state_dict (in our names), metadata and format of what ``torch.load`` read from ``path``."""
    metadata: dict[str, Any] = {}
    fmt = "torch"
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # ours
        metadata = dict(obj.get("metadata") or {})
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):  # a training checkpoint
        metadata = _checkpoint_metadata(obj)
        obj, fmt = obj["model"], "checkpoint"
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} holds no state_dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entry {bad[0]!r} is not a named tensor")
    state_dict: dict[str, torch.Tensor] = dict(obj)
    if fmt == "torch" and is_torchvision_vgg16(state_dict):
        try:
            state_dict = convert_torchvision_vgg16(state_dict)
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from exc
        fmt = "torchvision-vgg16"
    elif any(k in state_dict for k in PORT_KEYS):
        fmt = "port-pth"
        state_dict = convert_port_state_dict(state_dict)
    return state_dict, metadata, fmt


def read_weights(
    path: str | os.PathLike, *, allow_backbone: bool = False
) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Read any supported weights file into our state_dict (CPU float32 tensors) and its :class:`WeightsInfo`.

    Conventions are converted (port key names and compatibility sign; Caffe layer names and legacy shapes;
    torchvision VGG-16 names and fc shapes; the flat layout of a CRF-RNN to CrfRnnNet's composed one). See the
    module docstring for the kinds of file and the layouts.

    Args:
        path: a local file, an ``http(s)://`` URL or a published name (:mod:`crfasrnn.weights.hub`: downloaded once
            into the cache, verified, then read from there).
        allow_backbone: accept a file without class layers (no ``score_fr.weight``: a torchvision VGG-16, a
            backbone state_dict), with ``num_classes`` 0, e.g. to start training from it.

    Raises:
        FileNotFoundError: no such file.
        WeightsError: unreadable, truncated, not a weights file, or missing layers (``DownloadError``, one of them:
            a download that failed or gave another file).
    """
    path = fetch_weights(path)  # a registered name or a URL: the cached download
    fmt = detect_format(path)
    metadata: dict[str, Any] = {}
    if fmt == "caffe":
        blobs, fmt = read_caffemodel(path)
        state_dict = convert_caffe_blobs(blobs, where=str(path))
        del blobs
        # Caffe layer names are checked by convert_caffe_blobs; shapes against the model in load_weights.
    elif fmt == "hdf5":
        layers = read_keras_h5(path)  # the datasets' names and dtypes are checked there; shapes in load_weights
        state_dict, fmt = convert_keras_weights(layers, where=str(path)), "keras-h5"
        del layers
    elif fmt == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file (truncated?): {exc}") from exc
        if "crfasrnn" in raw_meta:
            try:
                metadata = json.loads(raw_meta["crfasrnn"])
            except json.JSONDecodeError as exc:
                raise WeightsError(f"{path}: its crfasrnn metadata is not valid JSON: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
            raise WeightsError(f"{path} is not a readable PyTorch weights file (truncated?): {exc}") from exc
        except Exception as exc:  # pickle.UnpicklingError and friends from weights_only's restricted unpickler
            raise WeightsError(f"{path} cannot be loaded safely as PyTorch weights: {exc}") from exc
        state_dict, metadata, fmt = _torch_contents(obj, path)
        del obj
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise WeightsError(f"{path}: tensor '{key}' has dtype {value.dtype}, expected floating point")
    state_dict = {k: v.float() for k, v in state_dict.items()}
    architecture = "CrfRnnNet" if fmt in PUBLISHED_FORMATS else architecture_of(state_dict)
    if architecture == "CrfRnnNet":
        try:
            state_dict = compose_keys(state_dict)
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from exc
    score = fcn_key(state_dict, "score_fr.weight")
    if score is not None:
        num_classes = int(state_dict[score].shape[0])
    elif allow_backbone:
        num_classes = 0
    else:
        vgg = fmt == "torchvision-vgg16"
        hint = " (a torchvision VGG-16 backbone: start training from it with `crfasrnn train --init`)" if vgg else ""
        raise WeightsError(
            f"{path}: tensor 'score_fr.weight' is missing; this is not a CRF-RNN / FCN-8s weights file{hint}"
        )
    width = metadata["width"] if "width" in metadata else width_of(state_dict)  # checked by metadata_width
    meta = {**default_metadata(num_classes, width=width, architecture=architecture), **metadata}
    meta["architecture"] = architecture  # what the tensors are, whatever an older file's metadata claims
    if fmt in PUBLISHED_FORMATS:
        meta.setdefault("licence", LICENCE)  # the published model's terms travel with every file made from it
    if fmt not in ("safetensors", "torch") or "source_file" not in meta:
        meta.setdefault("source_file", path.name)
        meta.setdefault("source_format", fmt)
    info = WeightsInfo(str(path), fmt, file_sha256(path), num_classes, meta)
    if "source_sha256" not in info.metadata:
        info.metadata["source_sha256"] = info.sha256
    return state_dict, info


def network_for(
    state_dict: Mapping[str, torch.Tensor], info: WeightsInfo, *, num_iterations: int = 10, **crf_kwargs: Any
) -> CrfRnnNet | FCN8s:
    """The network (weights not loaded) that ``read_weights`` results describe, built on the default device.

    A :class:`~crfasrnn.models.CrfRnnNet` of ``num_iterations`` mean-field steps when the file has ``crf.*`` tensors
    or is a published CRF-RNN format, else an :class:`~crfasrnn.models.FCN8s` (``num_iterations`` and ``crf_kwargs``
    are then unused); ``info.num_classes`` classes and the width of the metadata
    (:func:`~crfasrnn.weights.format.metadata_width`; ``read_weights`` records ``conv1_1``'s where the file records
    none).

    Raises:
        WeightsError: a file without class layers (a VGG-16 backbone).
        ValueError: a width in the metadata that is not a finite number > 0.
    """
    if info.num_classes < 1:
        raise WeightsError(f"{info.path} ({info.format}) has no class layers (no score_fr.weight): no network to build")
    width = metadata_width(info)
    if info.format in PUBLISHED_FORMATS or architecture_of(state_dict) == "CrfRnnNet":
        options = {**higher_order_options(state_dict), **crf_kwargs}
        return CrfRnnNet(info.num_classes, num_iterations, width=width, **options)
    return FCN8s(info.num_classes, width=width)


def state_dict_for(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (from :func:`read_weights`, a checkpoint, …) under ``model``'s key names.

    For a :class:`~crfasrnn.models.CrfRnnNet`, keys of the flat layout (an FCN-8s's, or a CRF-RNN's of the versions
    whose CrfRnnNet subclassed FCN8s) are composed by :func:`~crfasrnn.weights.convert.compose_keys`, the one
    mapping from the flat layout. A plain :class:`~crfasrnn.models.FCN8s` takes a CrfRnnNet's backbone: the
    ``backbone.`` prefix is dropped, and the ``crf.*`` tensors stay as they are (unexpected). Any other model gets
    the state_dict unchanged.

    Raises:
        WeightsError: a state_dict holding a tensor under both layouts' names.

    Example:
        >>> net = CrfRnnNet(3, width=1 / 64)
        >>> flat = {**net.backbone.state_dict(), **{f"crf.{k}": v for k, v in net.crf.state_dict().items()}}
        >>> net.load_state_dict(state_dict_for(net, flat))
        <All keys matched successfully>
    """
    if isinstance(model, CrfRnnNet):
        return compose_keys(state_dict)
    if isinstance(model, FCN8s):
        cut = len(BACKBONE_PREFIX)
        return {k[cut:] if k.startswith(BACKBONE_PREFIX) else k: v for k, v in state_dict.items()}
    return dict(state_dict)


def _validate(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, info: WeightsInfo, *, strict: bool
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    where = info.path
    try:
        state_dict = state_dict_for(model, state_dict)
    except WeightsError as exc:
        raise WeightsError(f"{where}: {exc}") from exc
    expected = model.state_dict()
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and info.num_classes != model_classes:
        score = fcn_key(state_dict, "score_fr.weight")
        shown = f" ({score} {tuple(state_dict[score].shape)})" if score is not None else ""
        raise WeightsError(f"{where} has {info.num_classes} classes{shown} but the model has {model_classes}")
    missing = tuple(k for k in expected if k not in state_dict)
    unexpected = tuple(k for k in state_dict if k not in expected)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        raise WeightsError(f"{where} does not fit the model ({info.format}): {'; '.join(parts)}")
    checked = {}
    for key, value in state_dict.items():
        if key not in expected:
            continue
        target = tuple(expected[key].shape)
        shape = tuple(value.shape)
        if shape != target:
            if squeeze_leading(shape) == squeeze_leading(target):  # Caffe's legacy (1, 1, ..) shapes
                value = value.reshape(target)
            else:
                raise WeightsError(f"{where}: tensor '{key}' has shape {shape} but the model expects {target}")
        if not torch.isfinite(value).all():
            raise WeightsError(f"{where}: tensor '{key}' {shape} contains NaN or Inf")
        checked[key] = value
    return checked, missing, unexpected


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> WeightsInfo:
    """Load a weights file of any supported format into ``model`` (a :class:`~crfasrnn.models.CrfRnnNet` or FCN8s).

    Every tensor is checked (name, shape, class count, finite values) before anything is copied, so on error the
    model is unchanged. Values are copied to the model's device and dtype. The file's keys are put in the model's
    layout first (:func:`state_dict_for`), so an FCN-8s file initialises a CrfRnnNet's backbone (``strict=False``)
    and a CRF-RNN file a plain FCN8s.

    Args:
        model: the network (a CrfRnnNet over an FCN8s, or an FCN8s).
        path: any file :func:`read_weights` reads that has class layers: a ``.caffemodel`` (V1 or V2), the PyTorch
            port's ``.pth``, our safetensors / torch file, a training checkpoint.
        strict: require the file's tensors and the model's to match one to one. With ``strict=False`` the tensors
            the model lacks are ignored and the model's tensors the file lacks keep their values (both are listed in
            the returned info), e.g. to load a CRF-RNN file into a plain :class:`~crfasrnn.models.FCN8s`.

    Returns:
        :class:`WeightsInfo` (format, sha256, class names and other metadata).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: an unreadable or truncated file, missing or unexpected tensors (``strict``), a wrong shape or
            class count, non-finite values. The message names the file and the tensor.
    """
    state_dict, info = read_weights(path)
    checked, missing, unexpected = _validate(state_dict, model, info, strict=strict)
    del state_dict
    model.load_state_dict(checked, strict=False)
    if missing or unexpected:
        logger.info("loaded %s without %s; ignored %s", path, list(missing), list(unexpected))
    logger.info("loaded %s weights from %s (sha256 %s)", info.format, path, info.sha256)
    return dataclasses.replace(info, missing_keys=missing, unexpected_keys=unexpected)


def load_model(
    path: str | os.PathLike, *, num_iterations: int = 10, device: str | torch.device = "cpu", **crf_kwargs: Any
) -> tuple[CrfRnnNet | FCN8s, WeightsInfo]:
    """Build the network a weights file describes (:func:`network_for`: CrfRnnNet or FCN8s, class count, width)
    and load it; any file :func:`read_weights` reads that has class layers (a training checkpoint included).

    The network is built without memory of its own (on the ``meta`` device) and takes the file's tensors over, so
    loading needs no second copy of the weights. Every tensor must fit (strict). Returns ``(model in eval mode on
    device, info)``; the model is a :class:`~crfasrnn.models.CrfRnnNet` (over an FCN8s) when the file has a CRF, else
    an :class:`~crfasrnn.models.FCN8s`.

    Raises:
        FileNotFoundError: no such file.
        WeightsError: see :func:`load_weights`; also a file without class layers (a VGG-16 backbone).
        ValueError: a width in the metadata that is not a finite number > 0.
    """
    state_dict, info = read_weights(path)
    with torch.device("meta"):
        model = network_for(state_dict, info, num_iterations=num_iterations, **crf_kwargs)
    checked, _, _ = _validate(state_dict, model, info, strict=True)
    del state_dict
    model.load_state_dict({k: v.contiguous() for k, v in checked.items()}, strict=True, assign=True)
    logger.info("built %s(%s) from %s (%s)", type(model).__name__, model.extra_repr(), path, info.format)
    return model.to(device).eval(), info


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike) -> WeightsInfo:
    """Convert a weights file (Caffe or port ``.pth``, a training checkpoint, or ours) to our format at ``dst``.

    The tensors are validated against the architecture they describe (:func:`network_for`) before anything is
    written. The metadata records the source file's name, format and sha256. Returns the :class:`WeightsInfo` of the
    written file.
    """
    src, dst = Path(src), Path(dst)
    state_dict, info = read_weights(src)
    with torch.device("meta"):
        model = network_for(state_dict, info)
    checked, _, _ = _validate(state_dict, model, info, strict=True)
    del state_dict
    meta = dict(info.metadata)
    sha = save_weights(checked, dst, metadata=meta)
    return WeightsInfo(
        str(dst), "safetensors" if dst.suffix == ".safetensors" else "torch", sha, info.num_classes, meta
    )
