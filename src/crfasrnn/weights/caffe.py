"""The Caffe reader: the blobs of a ``.caffemodel`` (``caffe.NetParameter`` protobuf), without Caffe or ``protoc``.

The published model ``TVG_CRFRNN_COCO_VOC.caffemodel`` is a ``NetParameter`` in the deprecated V1 form (``layers``,
field 2); newer Caffe writes the V2 form (``layer``, field 100). Both are parsed with the ``protobuf`` package and
message classes built at run time from a descriptor of the few ``caffe.proto`` fields that hold weights
(:func:`caffe_messages`); every other field of a real file is kept as an unknown field and ignored.

:func:`read_caffemodel` returns each layer's blobs as float32 arrays in Caffe's shapes (legacy 4-D shapes included);
:func:`crfasrnn.weights.convert.convert_caffe_blobs` maps them to our tensor names.
"""

from __future__ import annotations

import logging
import math
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import WeightsError

if TYPE_CHECKING:
    from google.protobuf import descriptor_pb2

logger = logging.getLogger(__name__)

__all__ = ["caffe_messages", "read_caffemodel"]


def _caffe_file_descriptor(raw: bool) -> descriptor_pb2.FileDescriptorProto:
    """The ``FileDescriptorProto`` of :func:`caffe_messages` (``raw``: packed float arrays declared as bytes)."""
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
        file_proto = _caffe_file_descriptor(raw)
        pool.Add(file_proto)
        file_desc = pool.FindFileByName(file_proto.name)
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
