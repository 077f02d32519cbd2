"""Weight files of the CRF-RNN network: the published Caffe model, the PyTorch port's ``.pth`` and our own format.

Three readers produce one state_dict in :class:`~crfasrnn.models.CrfRnnNet`'s names and conventions:

* **Caffe** ``.caffemodel`` (``TVG_CRFRNN_COCO_VOC.caffemodel``): a ``caffe.NetParameter`` protobuf, in the deprecated
  V1 form (``layers``, field 2) or the V2 form (``layer``, field 100). It is parsed with the ``protobuf`` package and
  a descriptor built at run time (:func:`caffe_messages`): no Caffe, no ``protoc``. Layer names are mapped with
  :data:`CAFFE_LAYERS`; the ``inference1`` blobs are W_s, W_b and the compatibility M, each (1, 1, C, C).
* **PyTorch port** ``crfasrnn_weights.pth`` (``sadeepj/crfasrnn_pytorch``): a plain state_dict, read with
  ``torch.load(weights_only=True)`` and renamed with :data:`PORT_KEYS`. The port stores ``-M`` (its update is
  ``Q = U + M·msg``), so the compatibility matrix changes sign (:func:`convert_port_state_dict`).
* **Our format**: safetensors with metadata (:func:`save_weights`), or ``torch.save`` of a state_dict (optionally in
  a ``{"state_dict": ..., "metadata": ...}`` dict), read with ``weights_only=True``.

:func:`load_weights` validates every tensor (names, shapes, class count, finiteness) before it copies anything into
the model, so a bad file leaves the model untouched. Errors are :class:`WeightsError` (a ``ValueError``) naming the
file and the tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write
from .transforms import NETWORK_SIZE, VOC_CLASSES, VOC_MEAN_RGB

logger = logging.getLogger(__name__)

__all__ = [
    "WeightsError",
    "WeightsInfo",
    "PORT_KEYS",
    "CAFFE_LAYERS",
    "PAPER",
    "caffe_messages",
    "detect_format",
    "read_caffemodel",
    "convert_caffe_blobs",
    "convert_port_state_dict",
    "read_weights",
    "load_weights",
    "load_model",
    "save_weights",
    "convert_weights",
    "default_metadata",
    "file_sha256",
    "WEIGHTS_HELP",
]

#: Where the published weights can be obtained (shown when none are given).
WEIGHTS_HELP = (
    "the published CRF-RNN weights are TVG_CRFRNN_COCO_VOC.caffemodel (Caffe; linked from the README of "
    "https://github.com/torrvision/crfasrnn) and crfasrnn_weights.pth (PyTorch port; release 0.0.1 of "
    "https://github.com/sadeepj/crfasrnn_pytorch/releases); pass either with --weights or CRFASRNN_WEIGHTS, or "
    "convert it once with `crfasrnn convert SRC DST` (accepts both formats)"
)

#: The paper's reference result for the published model (Zheng et al., ICCV 2015).
PAPER = {
    "title": "Conditional Random Fields as Recurrent Neural Networks",
    "authors": "Zheng, Jayasumana, Romera-Paredes, Vineet, Su, Du, Huang, Torr",
    "venue": "ICCV 2015",
    "miou": 74.7,
    "miou_dataset": "PASCAL VOC 2012 test (CRF-RNN trained on VOC 2012 + COCO)",
}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file and the tensor."""


# --------------------------------------------------------------------------------------------------- key tables

#: The PyTorch port's state_dict keys that differ from ours (every other key is the same), and the factor applied.
PORT_KEYS: dict[str, tuple[str, float]] = {
    "crfrnn.spatial_ker_weights": ("crf.spatial_weights", 1.0),
    "crfrnn.bilateral_ker_weights": ("crf.bilateral_weights", 1.0),
    "crfrnn.compatibility_matrix": ("crf.compatibility", -1.0),  # the port's update is U + M·msg, ours U − M·msg
}

#: Caffe layer name of the published model -> our tensor names of its blobs, in blob order.
CAFFE_LAYERS: dict[str, tuple[str, ...]] = {
    **{
        name: (f"{name}.weight", f"{name}.bias")
        for name in (
            "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
            "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7",
        )
    },  # fmt: skip
    "score-fr": ("score_fr.weight", "score_fr.bias"),
    "score2": ("upscore2.weight", "upscore2.bias"),
    "score-pool4": ("score_pool4.weight", "score_pool4.bias"),
    "score4": ("upscore_pool4.weight",),
    "score-pool3": ("score_pool3.weight", "score_pool3.bias"),
    "upsample": ("upscore8.weight",),
    "inference1": ("crf.spatial_weights", "crf.bilateral_weights", "crf.compatibility"),
}

_CRF_KEYS = ("crf.spatial_weights", "crf.bilateral_weights", "crf.compatibility")


# --------------------------------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """What was read: the file, its format and sha256, and the metadata that travels with the weights.

    ``metadata`` holds ``classes`` (names), ``preprocessing`` (mean, channel order, sizes), ``source_file`` /
    ``source_sha256`` / ``source_format`` (the published file it came from), ``paper`` (reference mIoU), ``width``.
    """

    path: str
    format: str  #: "caffe-v1", "caffe-v2", "port-pth", "safetensors" or "torch"
    sha256: str
    num_classes: int
    metadata: dict[str, Any]
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = label."""
        names = self.metadata.get("classes")
        if names and len(names) == self.num_classes:
            return tuple(names)
        return tuple(f"class_{i}" for i in range(self.num_classes))


def default_metadata(num_classes: int, *, width: float = 1.0) -> dict[str, Any]:
    """The metadata of a CRF-RNN model: VOC class names (for 21 classes), the reference preprocessing, the paper."""
    meta: dict[str, Any] = {
        "architecture": "CrfRnnNet",
        "num_classes": num_classes,
        "width": width,
        "num_iterations": 10,
        "preprocessing": {
            "resize": f"bilinear, longest side at most {NETWORK_SIZE}",
            "mean_rgb": list(VOC_MEAN_RGB),
            "subtract": "RGB mean, then channels flipped to BGR",
            "channel_order": "BGR",
            "pad_to": [NETWORK_SIZE, NETWORK_SIZE],
        },
    }
    if num_classes == len(VOC_CLASSES):
        meta["classes"] = list(VOC_CLASSES)
    if num_classes == len(VOC_CLASSES) and width == 1.0:
        meta["paper"] = dict(PAPER)
    return meta


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- Caffe protobuf


def _caffe_file_descriptor(raw: bool):
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="crfasrnn_caffe.proto", package="crfasrnn_caffe", syntax="proto2")

    def message(name: str, fields):
        m = f.message_type.add(name=name)
        for number, field_name, label, kind, type_name, packed in fields:
            field = m.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = f".crfasrnn_caffe.{type_name}"
            if packed:
                field.options.packed = True

    opt, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REPEATED
    msg, string, int32, int64 = fdp.TYPE_MESSAGE, fdp.TYPE_STRING, fdp.TYPE_INT32, fdp.TYPE_INT64
    # ``raw``: the packed float/double arrays declared as bytes (the same wire type, 2): the parser hands over each
    # array's little-endian bytes as one object instead of one Python float per value.
    floats = (rep, fdp.TYPE_BYTES, None, False) if raw else (rep, fdp.TYPE_FLOAT, None, True)
    doubles = (rep, fdp.TYPE_BYTES, None, False) if raw else (rep, fdp.TYPE_DOUBLE, None, True)
    # Field numbers of BVLC caffe.proto (also those of the CRF-RNN fork).
    message("BlobShape", [(1, "dim", rep, int64, None, True)])
    message("BlobProto", [
        (1, "num", opt, int32, None, False), (2, "channels", opt, int32, None, False),
        (3, "height", opt, int32, None, False), (4, "width", opt, int32, None, False),
        (5, "data", *floats), (7, "shape", opt, msg, "BlobShape", False), (8, "double_data", *doubles),
    ])  # fmt: skip
    message("LayerParameter", [
        (1, "name", opt, string, None, False), (2, "type", opt, string, None, False),
        (7, "blobs", rep, msg, "BlobProto", False),
    ])  # fmt: skip
    message("V1LayerParameter", [  # type is the LayerType enum in caffe.proto; int32 has the same encoding
        (4, "name", opt, string, None, False), (5, "type", opt, int32, None, False),
        (6, "blobs", rep, msg, "BlobProto", False),
    ])  # fmt: skip
    message("NetParameter", [
        (1, "name", opt, string, None, False), (2, "layers", rep, msg, "V1LayerParameter", False),
        (100, "layer", rep, msg, "LayerParameter", False),
    ])  # fmt: skip
    return f


_MESSAGES: dict[bool, types.SimpleNamespace] = {}


def caffe_messages(*, raw: bool = False) -> types.SimpleNamespace:
    """Message classes for the parts of ``caffe.proto`` that hold weights, built at run time from a descriptor.

    ``NetParameter`` (``name`` 1, ``layers`` 2 (V1), ``layer`` 100), ``LayerParameter`` (``name`` 1, ``type`` 2,
    ``blobs`` 7), ``V1LayerParameter`` (``name`` 4, ``type`` 5, ``blobs`` 6), ``BlobProto`` (``num``/``channels``/
    ``height``/``width`` 1-4, ``data`` 5, ``shape`` 7, ``double_data`` 8) and ``BlobShape`` (``dim`` 1). Other fields
    of a real file are kept as unknown fields and ignored.

    Args:
        raw: declare the packed ``data`` / ``double_data`` arrays as ``bytes`` (fast reading); otherwise as
            ``repeated float`` / ``double`` (for writing files, and for files whose arrays are not packed).

    Example:
        >>> m = caffe_messages()
        >>> net = m.NetParameter(name="n")
        >>> layer = net.layer.add(name="conv", type="Convolution")
        >>> layer.blobs.add().data.extend([1.0, 2.0])
        >>> raw = caffe_messages(raw=True).NetParameter.FromString(net.SerializeToString())
        >>> np.frombuffer(raw.layer[0].blobs[0].data[0], "<f4")
        array([1., 2.], dtype=float32)
    """
    if raw not in _MESSAGES:
        from google.protobuf import descriptor_pool, message_factory

        pool = descriptor_pool.DescriptorPool()
        file_desc = pool.Add(_caffe_file_descriptor(raw))
        file_desc = pool.FindFileByName(file_desc.name if hasattr(file_desc, "name") else "crfasrnn_caffe.proto")
        classes = {
            name: message_factory.GetMessageClass(file_desc.message_types_by_name[name])
            for name in ("NetParameter", "LayerParameter", "V1LayerParameter", "BlobProto", "BlobShape")
        }
        _MESSAGES[raw] = types.SimpleNamespace(**classes)
    return _MESSAGES[raw]


class _UnpackedArrays(Exception):
    """A blob whose float array is not packed: read the file again with typed fields."""


def _blob_array(blob, where: str, *, raw: bool) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:  # legacy 4-D shape; Caffe writes (1, 1, 1, N) for biases in V1 files
        shape = tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))
        if shape == (0, 0, 0, 0):
            shape = ()
    expected = math.prod(shape) if shape else None
    if raw:
        dtype = "<f4"
        chunks = list(blob.data)
        if not chunks and len(blob.double_data):
            dtype, chunks = "<f8", list(blob.double_data)
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        itemsize = np.dtype(dtype).itemsize
        if len(buf) % itemsize:
            raise WeightsError(f"{where}: data of {len(buf)} bytes is not a whole number of {dtype} values (corrupt)")
        count = len(buf) // itemsize
        if count == 0 and expected:
            raise _UnpackedArrays
        # A read-only view of the bytes object the parser handed over (no copy yet): read_caffemodel makes the
        # arrays writable one by one after the parsed message is gone, so the file's values exist at most twice.
        array = np.frombuffer(buf, dtype=dtype)
    else:
        values = blob.data if len(blob.data) else blob.double_data
        count = len(values)
        array = np.fromiter(values, dtype=np.float32, count=count)
    if expected is None:
        shape = (count,)
    elif count != expected:
        raise WeightsError(f"{where}: shape {shape} needs {expected} values but the blob has {count} (truncated?)")
    return array.reshape(shape)


def read_caffemodel(path: str | os.PathLike) -> tuple[dict[str, list[np.ndarray]], str]:
    """Read the blobs of every layer of a Caffe ``.caffemodel`` that has blobs.

    Returns:
        ``({layer name: [blob arrays (float32, Caffe shapes)]}, version)`` with version ``"caffe-v1"`` (``layers``)
        or ``"caffe-v2"`` (``layer``).

    Raises:
        WeightsError: not a protobuf NetParameter, truncated, or a layer name that occurs twice with blobs.
    """
    path = Path(path)
    try:
        return _parse_caffemodel(path, raw=True)
    except _UnpackedArrays:
        logger.info("%s stores unpacked float arrays; reading it again with typed fields (slower)", path)
        return _parse_caffemodel(path, raw=False)


def _parse_caffemodel(path: Path, *, raw: bool) -> tuple[dict[str, list[np.ndarray]], str]:
    from google.protobuf.message import DecodeError

    net = caffe_messages(raw=raw).NetParameter()
    try:
        data = path.read_bytes()
        net.ParseFromString(data)
        del data  # the parsed message holds its own copy: drop the file's bytes before the arrays are made
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise WeightsError(
            f"{path} is not a readable Caffe model (protobuf NetParameter): {exc}; the file may be truncated or of "
            "another kind"
        ) from exc
    if len(net.layer) and len(net.layers):
        logger.warning("%s has both V2 'layer' and V1 'layers'; reading 'layer'", path)
    layers, version = (net.layer, "caffe-v2") if len(net.layer) else (net.layers, "caffe-v1")
    if not len(layers):
        raise WeightsError(f"{path} is not a Caffe model: no layers found in it (is it a NetParameter?)")
    blobs: dict[str, list[np.ndarray]] = {}
    for layer in layers:
        if not len(layer.blobs):
            continue
        if layer.name in blobs:
            raise WeightsError(f"{path}: layer '{layer.name}' occurs twice with weights")
        blobs[layer.name] = [
            _blob_array(b, f"{path}: layer '{layer.name}' blob {i}", raw=raw) for i, b in enumerate(layer.blobs)
        ]
    del net, layers, layer
    for arrays in blobs.values():  # writable float32 copies, replacing the read-only views one at a time
        for i, array in enumerate(arrays):
            arrays[i] = array.astype(np.float32)  # astype copies (also from float64)
            del array
    return blobs, version


def _squeeze_leading(shape: tuple[int, ...]) -> tuple[int, ...]:
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def convert_caffe_blobs(
    blobs: Mapping[str, list], expected_shapes: Mapping[str, tuple[int, ...]] | None = None, *, where: str = "file"
) -> dict[str, torch.Tensor]:
    """Map Caffe layer blobs to our state_dict with :data:`CAFFE_LAYERS` (a pure function over the key table).

    Caffe's legacy 4-D shapes are matched by dropping leading 1s (biases (1, 1, 1, N) -> (N,), CRF matrices
    (1, 1, C, C) -> (C, C)). Layers not in the table that carry blobs are reported as unexpected.

    Args:
        blobs: ``{caffe layer name: [arrays]}`` as :func:`read_caffemodel` returns them.
        expected_shapes: our tensor shapes, to reshape legacy shapes; without it, leading 1s are dropped from
            biases and the CRF matrices only.
        where: the file, for messages.

    Raises:
        WeightsError: a missing layer, a wrong number of blobs, an unexpected layer with blobs, or a blob whose
            shape cannot be the expected one.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = sorted(set(blobs) - set(CAFFE_LAYERS))
    if unexpected:
        raise WeightsError(f"{where}: unexpected Caffe layers with weights: {', '.join(unexpected)}")
    for layer, keys in CAFFE_LAYERS.items():
        if layer not in blobs:
            raise WeightsError(f"{where}: Caffe layer '{layer}' is missing (it holds {', '.join(keys)})")
        arrays = blobs[layer]
        if len(arrays) != len(keys):
            raise WeightsError(
                f"{where}: Caffe layer '{layer}' has {len(arrays)} blobs, expected {len(keys)} ({', '.join(keys)})"
            )
        for key, array in zip(keys, arrays):
            shape = tuple(array.shape)
            if expected_shapes is not None and key in expected_shapes:
                target = tuple(expected_shapes[key])
                if _squeeze_leading(shape) == _squeeze_leading(target):
                    shape = target
            elif key.endswith(".bias") or key.startswith("crf."):
                shape = _squeeze_leading(shape)
            out[key] = torch.from_numpy(np.ascontiguousarray(array).reshape(shape))
    return out


# --------------------------------------------------------------------------------------------------- PyTorch port


def convert_port_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PyTorch port's state_dict in our names and sign convention (a pure function over :data:`PORT_KEYS`).

    Example:
        >>> port = {"fc7.bias": torch.ones(2), "crfrnn.compatibility_matrix": torch.eye(2)}
        >>> ours = convert_port_state_dict(port)
        >>> sorted(ours), ours["crf.compatibility"][0, 0].item()
        (['crf.compatibility', 'fc7.bias'], -1.0)
    """
    out = {}
    for key, value in state_dict.items():
        if key in PORT_KEYS:
            new_key, factor = PORT_KEYS[key]
            out[new_key] = value * factor if factor != 1.0 else value
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------- reading


def detect_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch"`` (zip or pickle, the port's ``.pth`` included) or ``"caffe"``, from the bytes.

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
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "caffe"


def _tensor_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    metadata: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        metadata = dict(obj.get("metadata") or {})
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):  # a training checkpoint
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} holds no state_dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entry {bad[0]!r} is not a named tensor")
    return dict(obj), metadata


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Read any supported weights file into our state_dict (CPU float32 tensors) and its :class:`WeightsInfo`.

    Conventions are converted (port key names and compatibility sign; Caffe layer names and legacy shapes).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: unreadable, truncated, not a weights file, or missing layers.
    """
    path = Path(path)
    fmt = detect_format(path)
    metadata: dict[str, Any] = {}
    if fmt == "caffe":
        blobs, fmt = read_caffemodel(path)
        state_dict = convert_caffe_blobs(blobs, where=str(path))
        del blobs
        # Caffe layer names are checked by convert_caffe_blobs; shapes against the model in load_weights.
    elif fmt == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
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
        state_dict, metadata = _tensor_dict(obj, path)
        if any(k in state_dict for k in PORT_KEYS):
            fmt = "port-pth"
            state_dict = convert_port_state_dict(state_dict)
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise WeightsError(f"{path}: tensor '{key}' has dtype {value.dtype}, expected floating point")
    state_dict = {k: v.float() for k, v in state_dict.items()}
    if "score_fr.weight" not in state_dict:
        raise WeightsError(f"{path}: tensor 'score_fr.weight' is missing; this is not a CRF-RNN / FCN-8s weights file")
    num_classes = int(state_dict["score_fr.weight"].shape[0])
    conv1 = state_dict.get("conv1_1.weight")
    width = metadata.get("width", 1.0 if conv1 is None else conv1.shape[0] / 64)
    meta = {**default_metadata(num_classes, width=width), **metadata}
    if fmt not in ("safetensors", "torch") or "source_file" not in meta:
        meta.setdefault("source_file", path.name)
        meta.setdefault("source_format", fmt)
    info = WeightsInfo(str(path), fmt, file_sha256(path), num_classes, meta)
    if "source_sha256" not in info.metadata:
        info.metadata["source_sha256"] = info.sha256
    return state_dict, info


def _validate(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, info: WeightsInfo, *, strict: bool
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    where = info.path
    expected = model.state_dict()
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and info.num_classes != model_classes:
        raise WeightsError(
            f"{where} has {info.num_classes} classes (score_fr.weight {tuple(state_dict['score_fr.weight'].shape)}) "
            f"but the model has {model_classes}"
        )
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
            if _squeeze_leading(shape) == _squeeze_leading(target):  # Caffe's legacy (1, 1, ..) shapes
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
    model is unchanged. Values are copied to the model's device and dtype.

    Args:
        model: the network.
        path: a ``.caffemodel`` (V1 or V2), the PyTorch port's ``.pth``, or our safetensors / torch file.
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
    path: str | os.PathLike, *, num_iterations: int = 10, device: str | torch.device = "cpu", **crf_kwargs
) -> tuple[torch.nn.Module, WeightsInfo]:
    """Build the :class:`~crfasrnn.models.CrfRnnNet` a weights file describes (class count, width) and load it.

    The network is built without memory of its own (on the ``meta`` device) and takes the file's tensors over, so
    loading needs no second copy of the weights. Returns ``(model in eval mode on device, info)``.
    """
    from .models import CrfRnnNet

    state_dict, info = read_weights(path)
    conv1 = state_dict.get("conv1_1.weight")
    width = _metadata_width(info, path, 1.0 if conv1 is None else conv1.shape[0] / 64)
    with torch.device("meta"):
        model = CrfRnnNet(info.num_classes, num_iterations, width=width, **crf_kwargs)
    checked, _, _ = _validate(state_dict, model, info, strict=True)
    del state_dict
    model.load_state_dict({k: v.contiguous() for k, v in checked.items()}, strict=True, assign=True)
    return model.to(device).eval(), info


# --------------------------------------------------------------------------------------------------- writing


def _metadata_width(info: WeightsInfo, path: str | os.PathLike, default: float) -> float:
    """The channel width a file's metadata records (``default`` where it records none), checked."""
    raw = info.metadata.get("width", default)
    try:
        width = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"weights {path}: the metadata's width must be a number, got {raw!r}") from None
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"weights {path}: the metadata's width must be a finite number > 0, got {raw!r}")
    return width


def save_weights(
    model: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: Mapping | None = None
) -> str:
    """Write a model's (or a state_dict's) weights in our format, with metadata, atomically; returns the sha256.

    ``.safetensors`` (recommended): the metadata is stored as JSON under the ``crfasrnn`` key of the header.
    Any other suffix: ``torch.save({"format": "crfasrnn", "state_dict": ..., "metadata": ...})``, readable with
    ``weights_only=True``. The default metadata comes from :func:`default_metadata`; ``metadata`` entries override it.
    """
    path = Path(path)
    state_dict = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    if "score_fr.weight" not in state_dict:
        raise WeightsError("cannot save: the state_dict has no 'score_fr.weight' (not a CRF-RNN / FCN-8s model)")
    num_classes = int(state_dict["score_fr.weight"].shape[0])
    width = getattr(model, "width", state_dict["conv1_1.weight"].shape[0] / 64 if "conv1_1.weight" in state_dict else 1.0)
    meta = {**default_metadata(num_classes, width=float(width)), **dict(metadata or {})}
    if isinstance(model, torch.nn.Module) and hasattr(model, "crf"):
        meta["num_iterations"] = model.crf.num_iterations
    text = json.dumps(meta, sort_keys=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt", "crfasrnn": text}))
    else:
        payload = {"format": "crfasrnn", "state_dict": state_dict, "metadata": json.loads(text)}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return file_sha256(path)


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike) -> WeightsInfo:
    """Convert a published weights file (Caffe or port ``.pth``, or ours) to our format at ``dst``.

    The tensors are validated against the architecture they describe before anything is written. The metadata
    records the source file's name, format and sha256. Returns the :class:`WeightsInfo` of the written file.
    """
    from .models import CrfRnnNet

    src, dst = Path(src), Path(dst)
    state_dict, info = read_weights(src)
    width = _metadata_width(info, src, 1.0)
    with torch.device("meta"):
        model = CrfRnnNet(info.num_classes, width=width)
    checked, _, _ = _validate(state_dict, model, info, strict=True)
    del state_dict
    meta = dict(info.metadata)
    sha = save_weights(checked, dst, metadata=meta)
    return WeightsInfo(str(dst), "safetensors" if dst.suffix == ".safetensors" else "torch", sha, info.num_classes, meta)
