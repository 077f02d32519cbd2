"""Weight files of the CRF-RNN network: the published Caffe model, the PyTorch port's ``.pth``, our own format, and
the files of training (checkpoints, torchvision VGG-16), all read into one state_dict in
:class:`~crfasrnn.models.CrfRnnNet`'s names and conventions (its composed layout: ``backbone.*``, ``crf.*``; an
FCN-8s file in :class:`~crfasrnn.models.FCN8s`'s).

One module per job:

* :mod:`~crfasrnn.weights.caffe`: the Caffe ``.caffemodel`` reader (a ``caffe.NetParameter`` protobuf, V1 or V2,
  parsed with message classes built at run time: no Caffe, no ``protoc``).
* :mod:`~crfasrnn.weights.keras`: the Keras port's ``.h5`` reader (HDF5, with h5py: the ``keras`` extra).
* :mod:`~crfasrnn.weights.convert`: the key tables (:data:`CAFFE_LAYERS`, :data:`PORT_KEYS`, :data:`KERAS_LAYERS`,
  :data:`VGG16_TORCHVISION_KEYS`, :data:`FLAT_KEYS`) and pure conversions to our names; the port stores ``-M``, so
  its compatibility matrix changes sign (the Keras port's keeps Caffe's), and the Keras kernels are channels-last;
  :func:`compose_keys` is the one mapping from the flat layout (the tables' names, our files of the versions whose
  CrfRnnNet subclassed FCN8s) to CrfRnnNet's.
* :mod:`~crfasrnn.weights.format`: our format (safetensors, or ``torch.save``, with metadata), :class:`WeightsInfo`,
  :func:`save_weights`.
* :mod:`~crfasrnn.weights.load`: the one loader: :func:`read_weights` recognises every kind of file,
  :func:`load_model` builds the network it holds (CrfRnnNet or FCN8s, class count, width), :func:`load_weights`
  loads into a given model; both validate every tensor before copying anything. :func:`state_dict_for` puts a
  state_dict in a model's layout.
* :mod:`~crfasrnn.weights.errors`: :class:`WeightsError` (a ``ValueError`` naming the file and the tensor).
"""

from __future__ import annotations

from .caffe import caffe_messages, read_caffemodel
from .convert import (
    CAFFE_LAYERS,
    FLAT_KEYS,
    KERAS_LAYERS,
    PORT_KEYS,
    VGG16_TORCHVISION_KEYS,
    compose_keys,
    convert_caffe_blobs,
    convert_keras_weights,
    convert_port_state_dict,
    convert_torchvision_vgg16,
    is_torchvision_vgg16,
)
from .errors import WeightsError
from .format import PAPER, WeightsInfo, default_metadata, file_sha256, save_weights
from .keras import read_keras_h5
from .load import (
    WEIGHTS_HELP,
    convert_weights,
    detect_format,
    fetch_weights,
    load_model,
    load_weights,
    network_for,
    read_weights,
    state_dict_for,
)

__all__ = [
    "WeightsError",
    "WeightsInfo",
    "PORT_KEYS",
    "CAFFE_LAYERS",
    "KERAS_LAYERS",
    "VGG16_TORCHVISION_KEYS",
    "FLAT_KEYS",
    "PAPER",
    "caffe_messages",
    "detect_format",
    "read_caffemodel",
    "convert_caffe_blobs",
    "convert_port_state_dict",
    "read_keras_h5",
    "convert_keras_weights",
    "is_torchvision_vgg16",
    "convert_torchvision_vgg16",
    "compose_keys",
    "fetch_weights",
    "read_weights",
    "state_dict_for",
    "network_for",
    "load_weights",
    "load_model",
    "save_weights",
    "convert_weights",
    "default_metadata",
    "file_sha256",
    "WEIGHTS_HELP",
]
