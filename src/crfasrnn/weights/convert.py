"""Key tables and pure conversions from the published layouts to our state_dict (names and conventions of
:class:`~crfasrnn.models.CrfRnnNet`). Nothing here reads or writes files.

* **Caffe** (:data:`CAFFE_LAYERS`): the layer names of ``TVG_CRFRNN_COCO_VOC.caffemodel`` and the order of their
  blobs; the ``inference1`` blobs are W_s, W_b and the compatibility M, each (1, 1, C, C) (Caffe's sign = ours).
  :func:`convert_caffe_blobs` maps :func:`~crfasrnn.weights.caffe.read_caffemodel`'s blobs and drops the leading 1s of
  the legacy 4-D shapes.
* **PyTorch port** (:data:`PORT_KEYS`, ``sadeepj/crfasrnn_pytorch``'s ``crfasrnn_weights.pth``): the backbone keys
  are ours; the CRF's are renamed, and the port stores ``-M`` (its update is ``Q = U + M·msg``), so the compatibility
  matrix changes sign (:func:`convert_port_state_dict`).
* **Keras port** (:data:`KERAS_LAYERS`, ``sadeepj/crfasrnn_keras``'s ``crfrnn_keras_model.h5``): Caffe's layer names
  (the CRF layer is ``crfrnn``), TensorFlow's channels-last kernels: a ``Conv2D`` kernel is (h, w, in, out), a
  ``Conv2DTranspose`` kernel (h, w, out, in), both permuted to PyTorch's (out, in, h, w) / (in, out, h, w) by
  :func:`convert_keras_weights`; the CRF matrices are Caffe's, in Caffe's sign (``Q = U − M·msg``, ``M`` from −I).
* **torchvision VGG-16** (:data:`VGG16_TORCHVISION_KEYS`, ``features.N`` / ``classifier.N``): an ImageNet backbone to
  start training from; :func:`convert_torchvision_vgg16` renames it to FCN-8s keys and reshapes the fully connected
  ``fc6`` to a 7×7 convolution and ``fc7`` to 1×1. ``classifier.6`` (the 1000-way classifier) is dropped.
* **The flat layout** (:data:`FLAT_KEYS`): the FCN-8s keys next to ``crf.*``, which the tables above give and in
  which our files and checkpoints were written while :class:`~crfasrnn.models.CrfRnnNet` subclassed FCN8s.
  :func:`compose_keys` is the one place that maps it to CrfRnnNet's composed layout (``backbone.conv1_1.weight``,
  ``crf.*``); the loader (:mod:`~crfasrnn.weights.load`) applies it to every CRF-RNN state_dict it reads or loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch

from .errors import WeightsError

T = TypeVar("T")

__all__ = [
    "PORT_KEYS",
    "CAFFE_LAYERS",
    "KERAS_LAYERS",
    "VGG16_TORCHVISION_KEYS",
    "FLAT_KEYS",
    "BACKBONE_PREFIX",
    "compose_keys",
    "fcn_key",
    "squeeze_leading",
    "convert_caffe_blobs",
    "convert_port_state_dict",
    "convert_keras_weights",
    "is_torchvision_vgg16",
    "convert_torchvision_vgg16",
]

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
            "conv1_1",
            "conv1_2",
            "conv2_1",
            "conv2_2",
            "conv3_1",
            "conv3_2",
            "conv3_3",
            "conv4_1",
            "conv4_2",
            "conv4_3",
            "conv5_1",
            "conv5_2",
            "conv5_3",
            "fc6",
            "fc7",
        )
    },
    "score-fr": ("score_fr.weight", "score_fr.bias"),
    "score2": ("upscore2.weight", "upscore2.bias"),
    "score-pool4": ("score_pool4.weight", "score_pool4.bias"),
    "score4": ("upscore_pool4.weight",),
    "score-pool3": ("score_pool3.weight", "score_pool3.bias"),
    "upsample": ("upscore8.weight",),
    "inference1": ("crf.spatial_weights", "crf.bilateral_weights", "crf.compatibility"),
}

#: Keras layer name of the Keras port's model (its ``src/crfrnn_model.py`` and ``src/crfrnn_layer.py``) -> (Keras
#: weight name, our tensor name) of its weights, in the order the layer creates them (the order in which Keras's
#: ``load_weights`` matches them). The FCN-8s layers carry Caffe's names (:data:`CAFFE_LAYERS`), the CRF layer is
#: ``crfrnn`` (Caffe's ``inference1``). ``score2``, ``score4`` and ``upsample`` are ``Conv2DTranspose`` layers.
KERAS_LAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    **{
        name: (("kernel", f"{name}.weight"), ("bias", f"{name}.bias"))
        for name in (
            "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
            "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7",
        )
    },
    "score-fr": (("kernel", "score_fr.weight"), ("bias", "score_fr.bias")),
    "score2": (("kernel", "upscore2.weight"), ("bias", "upscore2.bias")),
    "score-pool4": (("kernel", "score_pool4.weight"), ("bias", "score_pool4.bias")),
    "score4": (("kernel", "upscore_pool4.weight"),),  # use_bias=False
    "score-pool3": (("kernel", "score_pool3.weight"), ("bias", "score_pool3.bias")),
    "upsample": (("kernel", "upscore8.weight"),),  # use_bias=False
    "crfrnn": (
        ("spatial_ker_weights", "crf.spatial_weights"),
        ("bilateral_ker_weights", "crf.bilateral_weights"),
        ("compatibility_matrix", "crf.compatibility"),  # Caffe's sign: the Keras layer computes U − M·msg as ours
    ),
}  # fmt: skip

#: torchvision ``vgg16`` module prefix -> FCN-8s layer name. ``classifier.6`` (the 1000-way ImageNet classifier) has
#: no counterpart and is dropped.
VGG16_TORCHVISION_KEYS: dict[str, str] = {
    "features.0": "conv1_1", "features.2": "conv1_2",
    "features.5": "conv2_1", "features.7": "conv2_2",
    "features.10": "conv3_1", "features.12": "conv3_2", "features.14": "conv3_3",
    "features.17": "conv4_1", "features.19": "conv4_2", "features.21": "conv4_3",
    "features.24": "conv5_1", "features.26": "conv5_2", "features.28": "conv5_3",
    "classifier.0": "fc6", "classifier.3": "fc7",
}  # fmt: skip
_DROPPED = ("classifier.6.weight", "classifier.6.bias")

#: Where a CrfRnnNet holds its backbone's tensors (its ``backbone`` attribute).
BACKBONE_PREFIX = "backbone."

#: FCN-8s layer of the flat layout -> its name in CrfRnnNet's composed layout (the backbone's keys under
#: ``backbone.``); ``crf.*`` is the same in both.
FLAT_KEYS: dict[str, str] = {
    name: BACKBONE_PREFIX + name
    for name in (
        *(layer for layer in CAFFE_LAYERS if layer.startswith("conv")),
        "fc6", "fc7", "score_fr", "score_pool3", "score_pool4", "upscore2", "upscore_pool4", "upscore8",
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------------- layouts


def _composed_key(key: str) -> str:
    layer, dot, rest = key.partition(".")
    return FLAT_KEYS[layer] + dot + rest if layer in FLAT_KEYS and dot else key


def compose_keys(state_dict: Mapping[str, T]) -> dict[str, T]:
    """A state_dict of the flat layout in CrfRnnNet's composed one (a pure function over :data:`FLAT_KEYS`).

    Keys of the flat FCN-8s layers gain the ``backbone.`` prefix; every other key (``crf.*``, keys already composed,
    unknown keys, reported as unexpected by the loader) is kept as it is, so composing twice changes nothing.

    Raises:
        WeightsError: (a ``ValueError``) the state_dict holds a tensor under both layouts' names.

    Example:
        >>> compose_keys({"conv1_1.weight": 1, "crf.compatibility": 2, "backbone.fc6.bias": 3})
        {'backbone.conv1_1.weight': 1, 'crf.compatibility': 2, 'backbone.fc6.bias': 3}
    """
    out: dict[str, T] = {}
    for key, value in state_dict.items():
        new_key = _composed_key(key)
        if new_key in out:
            raise WeightsError(f"tensor '{new_key}' is given twice, under its flat and its composed name")
        out[new_key] = value
    return out


def fcn_key(state_dict: Mapping[str, object], name: str) -> str | None:
    """The key under which a state_dict of either layout holds FCN-8s tensor ``name`` (FCN8s's own key), or None.

    Example:
        >>> fcn_key({"backbone.score_fr.weight": 0}, "score_fr.weight"), fcn_key({"fc7.bias": 0}, "fc7.bias")
        ('backbone.score_fr.weight', 'fc7.bias')
    """
    return next((key for key in (name, _composed_key(name)) if key in state_dict), None)


# --------------------------------------------------------------------------------------------------- Caffe


def squeeze_leading(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without its leading 1s (one dimension at least is kept): Caffe's legacy 4-D shapes to ours.

    Example:
        >>> squeeze_leading((1, 1, 1, 4)), squeeze_leading((1, 1, 21, 21)), squeeze_leading((1,))
        ((4,), (21, 21), (1,))
    """
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
        blobs: ``{caffe layer name: [arrays]}`` as :func:`~crfasrnn.weights.caffe.read_caffemodel` returns them.
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
                if squeeze_leading(shape) == squeeze_leading(target):
                    shape = target
            elif key.endswith(".bias") or key.startswith("crf."):
                shape = squeeze_leading(shape)
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


# --------------------------------------------------------------------------------------------------- Keras port


def convert_keras_weights(
    layers: Mapping[str, Mapping[str, np.ndarray]], *, where: str = "file"
) -> dict[str, torch.Tensor]:
    """Map the Keras port's layer weights to our state_dict with :data:`KERAS_LAYERS` (a pure function).

    Kernels (4-D) go from TensorFlow's channels-last layout to PyTorch's: a ``Conv2D`` kernel (h, w, in, out) becomes
    ``Conv2d``'s (out, in, h, w) and a ``Conv2DTranspose`` kernel (h, w, out, in) ``ConvTranspose2d``'s (in, out, h,
    w): the same axis permutation (3, 2, 0, 1) for both; neither flips the kernel (both frameworks' convolutions are
    cross-correlations, their transposed convolutions its adjoint). Biases (1-D) and the CRF matrices (C×C, applied as
    ``M @ x`` in both, Caffe's sign in both) are kept as they are.

    Args:
        layers: ``{Keras layer name: {Keras weight name: array}}``, as
            :func:`~crfasrnn.weights.keras.read_keras_h5` returns it.
        where: the file, for messages.

    Raises:
        WeightsError: a missing layer or weight, an unexpected layer with weights, or an array whose number of
            dimensions is not that of its tensor.

    Example:
        >>> layers = {name: {w: np.zeros((1, 1, 2, 3) if w == "kernel" else (3,), np.float32) for w, _ in weights}
        ...           for name, weights in KERAS_LAYERS.items() if name != "crfrnn"}
        >>> layers["crfrnn"] = {w: -np.eye(3, dtype=np.float32) for w, _ in KERAS_LAYERS["crfrnn"]}
        >>> out = convert_keras_weights(layers)
        >>> out["fc7.weight"].shape, out["crf.compatibility"][0, 0].item()
        (torch.Size([3, 2, 1, 1]), -1.0)
    """
    unexpected = sorted(name for name, weights in layers.items() if weights and name not in KERAS_LAYERS)
    if unexpected:
        raise WeightsError(f"{where}: unexpected Keras layers with weights: {', '.join(unexpected)}")
    out: dict[str, torch.Tensor] = {}
    for layer, weights in KERAS_LAYERS.items():
        if layer not in layers:
            keys = ", ".join(key for _, key in weights)
            raise WeightsError(f"{where}: Keras layer '{layer}' is missing (it holds {keys})")
        arrays = layers[layer]
        extra = sorted(set(arrays) - {name for name, _ in weights})
        if extra:
            raise WeightsError(f"{where}: Keras layer '{layer}' has unexpected weights: {', '.join(extra)}")
        for name, key in weights:
            if name not in arrays:
                raise WeightsError(f"{where}: Keras layer '{layer}' has no weight '{name}' (our {key})")
            array = np.asarray(arrays[name])
            ndim = 2 if key.startswith("crf.") else 4 if key.endswith(".weight") else 1
            if array.ndim != ndim:
                raise WeightsError(
                    f"{where}: Keras weight '{layer}/{name}' has shape {tuple(array.shape)}, expected {ndim} dimensions"
                    f" (our {key})"
                )
            if ndim == 4:
                array = array.transpose(3, 2, 0, 1)
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


# ------------------------------------------------------------------------------------------ torchvision VGG-16


def is_torchvision_vgg16(state_dict: Mapping[str, object]) -> bool:
    """Whether a state_dict has torchvision's VGG-16 layout (``features.0`` and ``classifier.0`` tensors)."""
    return "features.0.weight" in state_dict and "classifier.0.weight" in state_dict


def convert_torchvision_vgg16(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision VGG-16 state_dict to FCN-8s keys; ``fc6`` becomes (out, in, 7, 7), ``fc7`` (out, in, 1, 1).

    A pure function over :data:`VGG16_TORCHVISION_KEYS`.

    Raises:
        WeightsError: (a ``ValueError``) a key of the table is missing, a key is unknown, or ``classifier.0`` does
            not reshape to 7×7.

    Example:
        >>> sd = {f"{k}.{p}": torch.zeros(1) for k in VGG16_TORCHVISION_KEYS for p in ("weight", "bias")}
        >>> sd["classifier.0.weight"] = torch.zeros(8, 2 * 49)
        >>> sd["classifier.3.weight"] = torch.zeros(8, 8)
        >>> out = convert_torchvision_vgg16(sd)
        >>> out["fc6.weight"].shape, out["fc7.weight"].shape, out["conv5_3.bias"].shape
        (torch.Size([8, 2, 7, 7]), torch.Size([8, 8, 1, 1]), torch.Size([1]))
    """
    table = {f"{src}.{p}": f"{dst}.{p}" for src, dst in VGG16_TORCHVISION_KEYS.items() for p in ("weight", "bias")}
    missing = sorted(set(table) - set(state_dict))
    if missing:
        raise WeightsError(f"not a complete torchvision VGG-16 state_dict: missing {', '.join(missing[:5])}")
    unknown = sorted(set(state_dict) - set(table) - set(_DROPPED))
    if unknown:
        raise WeightsError(f"unexpected tensors in the VGG-16 state_dict: {', '.join(unknown[:5])}")
    out = {dst: state_dict[src] for src, dst in table.items()}
    fc6 = out["fc6.weight"]
    if fc6.ndim != 2 or fc6.shape[1] % 49:
        raise WeightsError(f"classifier.0.weight must be (out, in·7·7) to become fc6, got {tuple(fc6.shape)}")
    out["fc6.weight"] = fc6.reshape(fc6.shape[0], fc6.shape[1] // 49, 7, 7)
    fc7 = out["fc7.weight"]
    if fc7.ndim != 2:
        raise WeightsError(f"classifier.3.weight must be (out, in) to become fc7, got {tuple(fc7.shape)}")
    out["fc7.weight"] = fc7.reshape(*fc7.shape, 1, 1)
    return out
