"""The Keras port's weights file (``crfrnn_keras_model.h5``, release v1.0 of ``sadeepj/crfasrnn_keras``), read with
h5py (the ``keras`` extra: ``pip install 'crfasrnn[keras]'``); no Keras, no TensorFlow.

Keras 2 writes one HDF5 group per layer, under ``/model_weights`` for ``model.save`` and at the root for
``model.save_weights``; the group lists its weights in the attribute ``weight_names`` (in the order the layer creates
them) and holds each under that name, the TensorFlow variable's: ``/model_weights/conv1_1/conv1_1/kernel:0``,
``…/conv1_1/bias:0``, ``/model_weights/crfrnn/crfrnn/compatibility_matrix:0``. A weight is found by the last part of
its name without the ``:0`` (``kernel``, ``bias``, ``spatial_ker_weights`` …); where a file's names say nothing
(``param_0``), by its position in ``weight_names``, as Keras's own ``load_weights`` matches them. Layers without
weights (pooling, dropout, cropping) have empty groups. The layer names, the layouts and the sign are in
:data:`~crfasrnn.weights.convert.KERAS_LAYERS` and :func:`~crfasrnn.weights.convert.convert_keras_weights`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from .convert import KERAS_LAYERS
from .errors import WeightsError

__all__ = ["KERAS_HINT", "read_keras_h5"]

#: What to install to read ``.h5`` files.
KERAS_HINT = "pip install 'crfasrnn[keras]'"


def _h5py() -> Any:
    try:
        return importlib.import_module("h5py")
    except ImportError:
        raise MissingDependencyError(f"reading the Keras port's .h5 weights needs h5py: {KERAS_HINT}") from None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _names(attrs: Any, key: str) -> list[str] | None:
    """An HDF5 attribute holding a list of names (bytes or str, as h5py returns them), or None when absent."""
    if key not in attrs:
        return None
    return [_text(v) for v in np.atleast_1d(attrs[key])]


def _weight_name(dataset_name: str) -> str:
    """``conv1_1/kernel:0`` -> ``kernel``: the variable's own name, without its scope and output index."""
    return dataset_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _datasets(h5py: Any, group: Any, where: str) -> tuple[list[tuple[str, Any]], bool]:
    """The ``(name, dataset)`` of a layer group, in the order of its ``weight_names``, and whether it had them."""
    listed = _names(group.attrs, "weight_names")
    if listed is not None:
        found = []
        for name in listed:
            dataset = group.get(name)
            if not isinstance(dataset, h5py.Dataset):
                raise WeightsError(f"{where}: dataset {group.name}/{name} is missing (its weight_names list it)")
            found.append((name, dataset))
        return found, True
    found = []
    group.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return found, False


def _layer_arrays(h5py: Any, group: Any, layer: str, where: str, prefix: str) -> dict[str, np.ndarray]:
    """``{Keras weight name: array}`` of a layer of :data:`KERAS_LAYERS`, each checked to be there and floating."""
    datasets, listed = _datasets(h5py, group, where)
    expected = [name for name, _ in KERAS_LAYERS[layer]]
    by_name = {_weight_name(name): (name, dataset) for name, dataset in datasets}
    if not set(by_name) <= set(expected) and listed and len(datasets) == len(expected):
        by_name = dict(zip(expected, datasets))  # names that say nothing: Keras's own rule, the order
    unexpected = sorted(set(by_name) - set(expected))
    if unexpected:
        paths = ", ".join(f"{group.name}/{by_name[name][0]}" for name in unexpected)
        raise WeightsError(f"{where}: Keras layer '{layer}' has unexpected weights: {paths}")
    arrays = {}
    for name, key in KERAS_LAYERS[layer]:
        if name not in by_name:
            held = ", ".join(f"{group.name}/{n}" for n, _ in datasets) or "no datasets"
            raise WeightsError(
                f"{where}: dataset {prefix}{layer}/{layer}/{name}:0 is missing (our {key}; the group holds {held})"
            )
        dataset_name, dataset = by_name[name]
        path = f"{group.name}/{dataset_name}"
        array = np.asarray(dataset[()])
        if array.dtype.kind != "f":
            raise WeightsError(f"{where}: dataset {path} has dtype {array.dtype}, expected floating point (our {key})")
        arrays[name] = array
    return arrays


def read_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The weights of a Keras 2 HDF5 file (``model.save`` or ``model.save_weights``) of the Keras port's model.

    Returns ``{Keras layer name: {Keras weight name: array}}`` (``{"conv1_1": {"kernel": …, "bias": …}, …}``) for
    :func:`~crfasrnn.weights.convert.convert_keras_weights`, in the file's layouts. Every layer of
    :data:`~crfasrnn.weights.convert.KERAS_LAYERS` must be there with all its weights; the other layers must have
    none (their names are returned, with their weights, for the conversion to report).

    Raises:
        MissingDependencyError: h5py is not installed (the ``keras`` extra).
        WeightsError: not a readable HDF5 file (truncated?), a missing layer or dataset (the message names the
            dataset's path), an unexpected weight, or a dataset that is not floating point.
    """
    h5py = _h5py()
    where = str(path)
    try:
        with h5py.File(Path(path), "r") as f:
            root = f["model_weights"] if isinstance(f.get("model_weights"), h5py.Group) else f
            prefix = root.name.rstrip("/") + "/"
            names = _names(root.attrs, "layer_names") or [k for k in root if isinstance(root[k], h5py.Group)]
            out: dict[str, dict[str, np.ndarray]] = {}
            for layer in KERAS_LAYERS:
                group = root.get(layer)
                if not isinstance(group, h5py.Group):
                    keys = ", ".join(key for _, key in KERAS_LAYERS[layer])
                    first = KERAS_LAYERS[layer][0][0]
                    raise WeightsError(
                        f"{where}: Keras layer '{layer}' is missing: no dataset {prefix}{layer}/{layer}/{first}:0 "
                        f"(it holds {keys}); is this the Keras port's crfrnn_keras_model.h5?"
                    )
                out[layer] = _layer_arrays(h5py, group, layer, where, prefix)
            for layer in names:
                group = root.get(layer)
                if layer in KERAS_LAYERS or not isinstance(group, h5py.Group):
                    continue
                datasets, _ = _datasets(h5py, group, where)
                if datasets:
                    out[layer] = {name: np.asarray(dataset[()]) for name, dataset in datasets}
    except (OSError, RuntimeError) as exc:  # h5py's errors of unreadable and truncated files
        raise WeightsError(f"{where} is not a readable HDF5 file (truncated?): {exc}") from exc
    return out
