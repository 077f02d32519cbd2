"""Initialising a network for training: from scratch, from ImageNet VGG-16 weights, or from earlier weights.

* :func:`he_initialise`: He-normal VGG/fc layers for training from scratch.
* :func:`initialise_from_file` reads any file :func:`crfasrnn.weights.read_weights` reads (a training checkpoint, a
  torchvision VGG-16 backbone, the published files, ours; the VGG-16 key table is
  :data:`crfasrnn.weights.convert.VGG16_TORCHVISION_KEYS`) and copies what fits into the model. Layers whose size
  depends on the class count (score layers, deconvolutions, CRF) are re-initialised when the file has another class
  count, and the report says so.

To build and load the network a file holds (for evaluation or inference), use :func:`crfasrnn.weights.load_model`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import FCN8s, bilinear_kernel
from .weights import read_weights

__all__ = [
    "he_initialise",
    "InitReport",
    "initialise_from_file",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

#: Layers whose shapes depend on the class count.
CLASS_LAYERS = ("score_fr", "score_pool3", "score_pool4", "upscore2", "upscore_pool4", "upscore8", "crf")

#: Formats of :func:`crfasrnn.weights.read_weights` that :func:`read_state_dict` reports as kinds of their own.
_KINDS = ("checkpoint", "torchvision-vgg16")


def _backbone_layers(model: FCN8s) -> list[nn.Conv2d]:
    """The VGG convolutions ``conv1_1`` … ``conv5_3`` and ``fc6``, ``fc7``, in order."""
    return [
        m
        for name, m in model.named_children()
        if (name.startswith("conv") or name in ("fc6", "fc7")) and isinstance(m, nn.Conv2d)
    ]


def _zero_bias(layer: nn.Conv2d | nn.ConvTranspose2d) -> None:
    if layer.bias is not None:
        layer.bias.zero_()


@torch.no_grad()
def he_initialise(model: FCN8s, *, input_scale: float = 64.0) -> None:
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
def reset_class_layers(model: FCN8s) -> None:
    """Score layers to zero, deconvolutions to bilinear upsampling, CRF to its initial values (the FCN recipe)."""
    for score in (model.score_fr, model.score_pool3, model.score_pool4):
        score.weight.zero_()
        _zero_bias(score)
    for deconv in (model.upscore2, model.upscore_pool4, model.upscore8):
        deconv.weight.copy_(bilinear_kernel(model.num_classes, deconv.weight.shape[-1], dtype=deconv.weight.dtype))
    _zero_bias(model.upscore2)
    crf = getattr(model, "crf", None)
    if crf is not None:
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

    Any file :func:`crfasrnn.weights.read_weights` reads, class layers or not. Kinds: ``"checkpoint"`` (written by
    ``crfasrnn train``), ``"torchvision-vgg16"`` (a backbone, converted to FCN-8s names), or ``"weights"`` (the
    published files, ours, a plain state_dict).

    Raises:
        FileNotFoundError: no such file.
        crfasrnn.weights.WeightsError: (a ``ValueError``) an unreadable file or one that holds no weights.
    """
    state, info = read_weights(path, allow_backbone=True)
    return state, info.format if info.format in _KINDS else "weights"


def initialise_from_file(model: FCN8s, path: str | os.PathLike) -> InitReport:
    """Copy the weights in ``path`` into ``model`` where they fit (see the module docstring).

    The VGG/fc backbone must be complete and of the model's width. Class-dependent layers of another class count are
    re-initialised (score layers zero, deconvolutions bilinear, CRF at its initial values); layers the file lacks keep
    the model's values (e.g. the CRF when starting CRF-RNN training from an FCN checkpoint).

    Raises:
        ValueError: backbone tensors missing or of other shapes (e.g. another ``width``), or an unreadable file.
    """
    state, kind = read_state_dict(path)
    report = InitReport(source=str(path), kind=kind)
    own = model.state_dict()
    backbone = [k for k in own if k.split(".")[0] not in CLASS_LAYERS]
    missing = [k for k in backbone if k not in state]
    if missing:
        raise ValueError(f"{path} ({kind}) lacks backbone tensors: {', '.join(missing[:5])}")
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in backbone if state[k].shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{path} ({kind}) does not fit the model (width {model.width:g}): {'; '.join(wrong[:3])}")
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
        class_keys = [k for k in own if k.split(".")[0] in CLASS_LAYERS]
        report.reinitialised = class_keys
        report.loaded = [k for k in report.loaded if k not in class_keys]
        report.kept = [k for k in report.kept if k not in class_keys]
        for k in class_keys:
            new_state[k] = own[k]
        logger.warning(
            "%s has another class count than the model (%d classes): re-initialised %s "
            "(score layers zero, upsampling bilinear, CRF at its initial values)",
            path, model.num_classes, ", ".join(sorted({k.split(".")[0] for k in class_keys})),
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
