"""Initialising a network for training: from scratch, from ImageNet VGG-16 weights, or from earlier weights.

* :func:`he_initialise`: He-normal VGG/fc layers for training from scratch.
* :func:`initialise_from_file` reads any file :func:`crfasrnn.weights.read_weights` reads (a training checkpoint, a
  torchvision VGG-16 backbone, the published files, ours; the VGG-16 key table is
  :data:`crfasrnn.weights.convert.VGG16_TORCHVISION_KEYS`) and copies what fits into the model. Layers whose size
  depends on the class count (score layers, deconvolutions, CRF) are re-initialised when the file has another class
  count, and the report says so. The file's keys are put in the model's layout by
  :func:`crfasrnn.weights.state_dict_for` (an FCN-8s file or an older flat-keyed one into a CrfRnnNet's
  ``backbone.*``), so the names the report lists are the model's.

The model is an :class:`~crfasrnn.models.FCN8s` or a :class:`~crfasrnn.models.CrfRnnNet` over one.

To build and load the network a file holds (for evaluation or inference), use :func:`crfasrnn.weights.load_model`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputTypeError
from .models import CrfRnnNet, FCN8s, bilinear_kernel
from .weights import read_weights, state_dict_for

__all__ = [
    "he_initialise",
    "InitReport",
    "initialise_from_file",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

#: Layers whose shapes depend on the class count: FCN-8s layers and the CRF (a CrfRnnNet's ``crf``).
CLASS_LAYERS = ("score_fr", "score_pool3", "score_pool4", "upscore2", "upscore_pool4", "upscore8", "crf")

#: Formats of :func:`crfasrnn.weights.read_weights` that :func:`read_state_dict` reports as kinds of their own.
_KINDS = ("checkpoint", "torchvision-vgg16")


def _fcn(model: FCN8s | CrfRnnNet) -> FCN8s:
    """The FCN-8s of a model: an FCN8s itself, a CrfRnnNet's backbone."""
    fcn = model.backbone if isinstance(model, CrfRnnNet) else model
    if not isinstance(fcn, FCN8s):
        raise InputTypeError(f"initialising needs an FCN8s or a CrfRnnNet over one, got a {type(fcn).__name__}")
    return fcn


def _class_layer_prefixes(model: FCN8s | CrfRnnNet) -> dict[str, str]:
    """:data:`CLASS_LAYERS` present in ``model`` -> the prefix of their keys in its state_dict (e.g.
    ``"backbone.score_fr."`` in a CrfRnnNet, ``"score_fr."`` in an FCN8s, ``"crf."``)."""
    fcn = _fcn(model)
    layers = {id(getattr(fcn, name)): name for name in CLASS_LAYERS if name != "crf"}
    if isinstance(model, CrfRnnNet):
        layers[id(model.crf)] = "crf"
    return {layers[id(m)]: f"{path}." for path, m in model.named_modules() if id(m) in layers}


def _backbone_layers(model: FCN8s | CrfRnnNet) -> list[nn.Conv2d]:
    """The VGG convolutions ``conv1_1`` … ``conv5_3`` and ``fc6``, ``fc7``, in order."""
    return [
        m
        for name, m in _fcn(model).named_children()
        if (name.startswith("conv") or name in ("fc6", "fc7")) and isinstance(m, nn.Conv2d)
    ]


def _zero_bias(layer: nn.Conv2d | nn.ConvTranspose2d) -> None:
    if layer.bias is not None:
        layer.bias.zero_()


@torch.no_grad()
def he_initialise(model: FCN8s | CrfRnnNet, *, input_scale: float = 64.0) -> None:
    """He (Kaiming) normal initialisation of the VGG convolutions and fc6/fc7 with zero biases, for training from
    scratch (PyTorch's default initialisation makes a 15-layer ReLU stack's activations vanish).

    He initialisation keeps unit-variance inputs at unit variance; the network's input is in 0..255 units
    (mean-subtracted, standard deviation ≈ 64 on photos), so ``conv1_1`` is scaled down by ``input_scale`` = 64 to
    start every layer at unit scale (else the first steps' gradients are ~10⁴ times too large).
    """
    layers = _backbone_layers(model)
    for layer in layers:
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        _zero_bias(layer)
    layers[0].weight.div_(input_scale)  # conv1_1


@torch.no_grad()
def reset_class_layers(model: FCN8s | CrfRnnNet) -> None:
    """Score layers to zero, deconvolutions to bilinear upsampling, CRF to its initial values (the FCN recipe)."""
    fcn = _fcn(model)
    for score in (fcn.score_fr, fcn.score_pool3, fcn.score_pool4):
        score.weight.zero_()
        _zero_bias(score)
    for deconv in (fcn.upscore2, fcn.upscore_pool4, fcn.upscore8):
        deconv.weight.copy_(bilinear_kernel(fcn.num_classes, deconv.weight.shape[-1], dtype=deconv.weight.dtype))
    _zero_bias(fcn.upscore2)
    if isinstance(model, CrfRnnNet):
        crf = model.crf
        eye = torch.eye(model.num_classes, dtype=crf.compatibility.dtype, device=crf.compatibility.device)
        crf.spatial_weights.copy_(3.0 * eye)  # CrfRnn's defaults: W_s = 3·I, W_b = 5·I, Potts compatibility −I
        crf.bilateral_weights.copy_(5.0 * eye)
        crf.compatibility.copy_(-eye)


@dataclass
class InitReport:
    """What :func:`initialise_from_file` did."""

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read weights from ``path`` as an FCN-8s / CRF-RNN state_dict in our key names, and say what the file was.

    The layout is the file's network's (see :func:`crfasrnn.weights.read_weights`); :func:`initialise_from_file` puts
    it in the model's.

    Any file :func:`crfasrnn.weights.read_weights` reads, class layers or not. Kinds: ``"checkpoint"`` (written by
    ``crfasrnn train``), ``"torchvision-vgg16"`` (a backbone, converted to FCN-8s names), or ``"weights"`` (the
    published files, ours, a plain state_dict).

    Raises:
        FileNotFoundError: no such file.
        crfasrnn.weights.WeightsError: (a ``ValueError``) an unreadable file or one that holds no weights.
    """
    state, info = read_weights(path, allow_backbone=True)
    return state, info.format if info.format in _KINDS else "weights"


def initialise_from_file(model: FCN8s | CrfRnnNet, path: str | os.PathLike) -> InitReport:
    """Copy the weights in ``path`` into ``model`` where they fit (see the module docstring).

    The VGG/fc backbone must be complete and of the model's width. Class-dependent layers of another class count are
    re-initialised (score layers zero, deconvolutions bilinear, CRF at its initial values); layers the file lacks keep
    the model's values (e.g. the CRF when starting CRF-RNN training from an FCN checkpoint).

    Raises:
        ValueError: backbone tensors missing or of other shapes (e.g. another ``width``), or an unreadable file.
    """
    state, kind = read_state_dict(path)
    try:
        state = state_dict_for(model, state)
    except ValueError as exc:
        raise ValueError(f"{path} ({kind}): {exc}") from exc
    report = InitReport(source=str(path), kind=kind)
    own = model.state_dict()
    prefixes = _class_layer_prefixes(model)
    class_prefixes = tuple(prefixes.values())
    backbone = [k for k in own if not k.startswith(class_prefixes)]
    missing = [k for k in backbone if k not in state]
    if missing:
        raise ValueError(f"{path} ({kind}) lacks backbone tensors: {', '.join(missing[:5])}")
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in backbone if state[k].shape != own[k].shape
    ]
    if wrong:
        width = _fcn(model).width
        raise ValueError(f"{path} ({kind}) does not fit the model (width {width:g}): {'; '.join(wrong[:3])}")
    reinit = False
    new_state = {k: state[k] for k in backbone}
    report.loaded.extend(backbone)
    for key in own:
        if key in new_state:
            continue
        if key not in state:
            report.kept.append(key)
        elif state[key].shape == own[key].shape:
            new_state[key] = state[key]
            report.loaded.append(key)
        else:
            reinit = True
    report.ignored = sorted(set(state) - set(own))
    if reinit:
        reset_class_layers(model)
        own = model.state_dict()
        class_keys = [k for k in own if k.startswith(class_prefixes)]
        report.reinitialised = class_keys
        report.loaded = [k for k in report.loaded if k not in class_keys]
        report.kept = [k for k in report.kept if k not in class_keys]
        for k in class_keys:
            new_state[k] = own[k]
        logger.warning(
            "%s has another class count than the model (%d classes): re-initialised %s "
            "(score layers zero, upsampling bilinear, CRF at its initial values)",
            path, model.num_classes, ", ".join(sorted(prefixes)),
        )  # fmt: skip
    for k in report.kept:
        new_state[k] = own[k]
    model.load_state_dict(new_state)
    logger.info(
        "initialised from %s (%s): %d tensors loaded, %d kept at their initial values%s",
        path, kind, len(report.loaded), len(report.kept),
        f", {len(report.ignored)} ignored ({', '.join(report.ignored[:4])})" if report.ignored else "",
    )  # fmt: skip
    return report
