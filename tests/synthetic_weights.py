"""Synthetic weight files of the published layouts (Caffe V1/V2 NetParameter, the PyTorch port's .pth, the Keras
port's .h5), for tests.

The Caffe files are written with the same runtime descriptor the reader uses (typed, packed float fields, as Caffe
writes them), with the layers of the deploy prototxt that carry no weights in between, as in the real file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crfasrnn.models import CrfRnnNet
from crfasrnn.weights import CAFFE_LAYERS, KERAS_LAYERS, PORT_KEYS, caffe_messages

# The V1 LayerType numbers of caffe.proto for the types used below (MULTI_STAGE_MEANFIELD is the fork's own).
_V1_TYPES = {
    "Convolution": 4,
    "Deconvolution": 39,
    "ReLU": 18,
    "Pooling": 17,
    "Dropout": 6,
    "Crop": 40,
    "Eltwise": 25,
    "Split": 22,
    "MultiStageMeanfield": 60,
}


def random_state_dict(num_classes: int = 21, *, width: float = 1 / 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of CrfRnnNet's shapes (fan-in scaled, so logits stay moderate); CRF matrices near the init.

    In the flat layout (FCN-8s keys next to ``crf.*``): the names the published formats' tables give, which the
    writers below take; ``crfasrnn.weights.compose_keys`` gives CrfRnnNet's keys.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        net = CrfRnnNet(num_classes, width=width)
        shapes = {k: v.shape for k, v in net.backbone.state_dict().items()}
        shapes.update({f"crf.{k}": v.shape for k, v in net.crf.state_dict().items()})
    out = {}
    for key, shape in shapes.items():
        std = shape[1:].numel() ** -0.5 if len(shape) > 1 else 0.1
        out[key] = torch.randn(shape, generator=gen) * std
    eye = torch.eye(num_classes)
    out["crf.spatial_weights"] = 3 * eye + 0.1 * out["crf.spatial_weights"]
    out["crf.bilateral_weights"] = 5 * eye + 0.1 * out["crf.bilateral_weights"]
    out["crf.compatibility"] = -eye + 0.1 * out["crf.compatibility"]
    return out


def _layer_sequence() -> list[tuple[str, str]]:
    """(name, type) of the deploy network's layers, in order, with the three `crop` and two `fuse` layers."""
    seq = []
    for stage, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
        for i in range(1, n + 1):
            seq += [(f"conv{stage}_{i}", "Convolution"), (f"relu{stage}_{i}", "ReLU")]
        seq.append((f"pool{stage}", "Pooling"))
    seq += [
        ("fc6", "Convolution"),
        ("relu6", "ReLU"),
        ("drop6", "Dropout"),
        ("fc7", "Convolution"),
        ("relu7", "ReLU"),
        ("drop7", "Dropout"),
        ("score-fr", "Convolution"),
        ("score2", "Deconvolution"),
        ("score-pool4", "Convolution"),
        ("crop", "Crop"),
        ("fuse", "Eltwise"),
        ("score4", "Deconvolution"),
        ("score-pool3", "Convolution"),
        ("crop", "Crop"),
        ("fuse", "Eltwise"),
        ("upsample", "Deconvolution"),
        ("crop", "Crop"),
        ("splitting", "Split"),
        ("inference1", "MultiStageMeanfield"),
    ]
    return seq


def caffe_blobs(state_dict: dict[str, torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Our state_dict as Caffe layer blobs (legacy 4-D shapes: biases (1,1,1,N), CRF matrices (1,1,C,C))."""
    blobs = {}
    for layer, keys in CAFFE_LAYERS.items():
        arrays = []
        for key in keys:
            a = state_dict[key].numpy()
            arrays.append(a.reshape((1,) * (4 - a.ndim) + a.shape))
        blobs[layer] = arrays
    return blobs


def write_caffemodel(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    v1: bool = True,
    legacy_shapes: bool = True,
    raw: bool = False,
    skip_layer: str | None = None,
    extra_layer: str | None = None,
) -> Path:
    """Write a NetParameter: V1 (`layers`, blobs in field 6, num/channels/height/width) or V2 (`layer`, BlobShape)."""
    m = caffe_messages(raw=raw)
    net = m.NetParameter(name="TVG_CRFRNN_COCO_VOC")
    blobs = caffe_blobs(state_dict)
    seq = _layer_sequence() + ([(extra_layer, "Convolution")] if extra_layer else [])
    for name, kind in seq:
        if name == skip_layer:
            continue
        layer = net.layers.add(name=name, type=_V1_TYPES[kind]) if v1 else net.layer.add(name=name, type=kind)
        arrays = blobs.get(name, [np.zeros((1, 1, 1, 3), np.float32)] if name == extra_layer else [])
        for a in arrays:
            blob = layer.blobs.add()
            if legacy_shapes:
                blob.num, blob.channels, blob.height, blob.width = a.shape
            else:
                squeezed = a.reshape(
                    a.shape[next(i for i, d in enumerate(a.shape) if d != 1) :] if a.size > 1 else (1,)
                )
                blob.shape.dim.extend(squeezed.shape)
            if raw:
                blob.data.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
            else:
                blob.data.extend(a.ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return path


def write_port_pth(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """The PyTorch port's plain state_dict: crfrnn.* names, compatibility with the opposite sign."""
    inverse = {ours: (port, factor) for port, (ours, factor) in PORT_KEYS.items()}
    port = {}
    for key, value in state_dict.items():
        if key in inverse:
            name, factor = inverse[key]
            port[name] = value * factor
        else:
            port[key] = value
    torch.save(port, path)
    return path


# The Keras port's layers without weights, in the order of its model (crfrnn_model.py): Keras 2 writes an empty group
# for each, named as Keras names them (the input, padding, pooling, dropout, cropping and add layers).
_KERAS_EMPTY = (
    "input_1", "zero_padding2d_1", "pool1", "pool2", "pool3", "pool4", "pool5", "dropout_1", "dropout_2",
    "cropping2d_1", "add_1", "cropping2d_2", "add_2", "cropping2d_3",
)  # fmt: skip


def keras_arrays(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """Our state_dict as the Keras port's weights, written from Keras's own layouts (not from our reader):

    a ``Conv2D`` kernel is (h, w, in, out) and ours (out, in, h, w); a ``Conv2DTranspose`` kernel is (h, w, out, in)
    and ours (in, out, h, w); both are ``permute(2, 3, 1, 0)`` of ours. Biases and CRF matrices as they are (the
    Keras layer computes ``U - M @ msg``, Caffe's sign and ours).
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer, weights in KERAS_LAYERS.items():
        out[layer] = {}
        for name, key in weights:
            value = state_dict[key]
            out[layer][name] = (value.permute(2, 3, 1, 0) if value.ndim == 4 else value).contiguous().numpy()
    return out


def write_keras_h5(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    full_model: bool = True,
    skip_layer: str | None = None,
    skip_weight: tuple[str, str] | None = None,
    extra_layer: str | None = None,
    replace: dict[tuple[str, str], np.ndarray] | None = None,
    generic_names: bool = False,
) -> Path:
    """An HDF5 file as Keras 2 (TensorFlow) writes the Keras port's model.

    ``full_model``: ``model.save``'s layout (``/model_weights/<layer>/<layer>/kernel:0``), else ``save_weights``'s
    (``/<layer>/<layer>/kernel:0``). Each layer group lists its datasets in ``weight_names``, the root its layers in
    ``layer_names``. ``skip_layer`` leaves a layer out, ``skip_weight`` (layer, weight) a dataset, ``extra_layer``
    adds a layer with a kernel, ``replace`` swaps (layer, weight)'s array, ``generic_names`` names the datasets
    ``param_0``, ``param_1`` … (a file whose names say nothing).
    """
    import h5py

    arrays = keras_arrays(state_dict)
    for (layer, name), array in (replace or {}).items():
        arrays[layer][name] = array
    if extra_layer:
        arrays[extra_layer] = {"kernel": np.zeros((1, 1, 3, 3), np.float32)}
    order = list(_KERAS_EMPTY[:2]) + [n for n in arrays if n.startswith("conv")] + list(_KERAS_EMPTY[2:])
    order += [n for n in arrays if n not in order]
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.1.2"
        f.attrs["backend"] = b"tensorflow"
        root = f.create_group("model_weights") if full_model else f
        if full_model:
            f.attrs["model_config"] = b'{"class_name": "Model", "config": {"name": "crfrnn_net"}}'
        names = [n for n in order if n != skip_layer]
        root.attrs["layer_names"] = np.array([n.encode() for n in names])  # fixed-length bytes, as Keras 2
        for layer in names:
            group = root.create_group(layer)
            weights = {} if layer in _KERAS_EMPTY else arrays[layer]
            listed = []
            for i, (name, array) in enumerate(weights.items()):
                if (layer, name) == skip_weight:
                    continue
                dataset = f"param_{i}" if generic_names else f"{layer}/{name}:0"
                group.create_dataset(dataset, data=array)
                listed.append(dataset.encode())
            group.attrs["weight_names"] = np.array(listed, dtype="S")
    return path
