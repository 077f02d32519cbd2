"""Initialising a network for training: from scratch, from ImageNet VGG-16 weights, or from earlier weights.

* :func:`convert_torchvision_vgg16` maps a torchvision-layout VGG-16 state_dict (``features.N`` / ``classifier.N``)
  onto FCN-8s names through a key table, reshaping the fully connected ``fc6`` to a 7×7 convolution and ``fc7`` to 1×1.
* :func:`initialise_from_file` reads a training checkpoint, a torchvision VGG-16 file or anything
  :func:`crfasrnn.weights.load_weights` reads, and copies what fits into the model. Layers whose size depends on the
  class count (score layers, deconvolutions, CRF) are re-initialised when the file has another class count, and the
  report says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import FCN8s, bilinear_kernel

__all__ = [
    "VGG16_TORCHVISION_KEYS",
    "convert_torchvision_vgg16",
    "he_initialise",
    "InitReport",
    "initialise_from_file",
    "read_state_dict",
    "model_from_file",
]

logger = logging.getLogger(__name__)

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

#: Layers whose shapes depend on the class count.
CLASS_LAYERS = ("score_fr", "score_pool3", "score_pool4", "upscore2", "upscore_pool4", "upscore8", "crf")


def is_torchvision_vgg16(state_dict: dict) -> bool:
    return "features.0.weight" in state_dict and "classifier.0.weight" in state_dict


def convert_torchvision_vgg16(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision VGG-16 state_dict to FCN-8s keys; ``fc6`` becomes (out, in, 7, 7), ``fc7`` (out, in, 1, 1).

    A pure function over :data:`VGG16_TORCHVISION_KEYS`.

    Raises:
        ValueError: a key of the table is missing, a key is unknown, or ``classifier.0`` does not reshape to 7×7.

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
        raise ValueError(f"not a complete torchvision VGG-16 state_dict: missing {', '.join(missing[:5])}")
    unknown = sorted(set(state_dict) - set(table) - set(_DROPPED))
    if unknown:
        raise ValueError(f"unexpected tensors in the VGG-16 state_dict: {', '.join(unknown[:5])}")
    out = {dst: state_dict[src] for src, dst in table.items()}
    fc6 = out["fc6.weight"]
    if fc6.ndim != 2 or fc6.shape[1] % 49:
        raise ValueError(f"classifier.0.weight must be (out, in·7·7) to become fc6, got {tuple(fc6.shape)}")
    out["fc6.weight"] = fc6.reshape(fc6.shape[0], fc6.shape[1] // 49, 7, 7)
    fc7 = out["fc7.weight"]
    if fc7.ndim != 2:
        raise ValueError(f"classifier.3.weight must be (out, in) to become fc7, got {tuple(fc7.shape)}")
    out["fc7.weight"] = fc7.reshape(*fc7.shape, 1, 1)
    return out


def _backbone_layers(model: FCN8s) -> list[nn.Conv2d]:
    return [m for name, m in model.named_children() if name.startswith("conv") or name in ("fc6", "fc7")]


@torch.no_grad()
def he_initialise(model: FCN8s, *, input_scale: float = 64.0) -> None:
    """He (Kaiming) normal initialisation of the VGG convolutions and fc6/fc7 with zero biases, for training from
    scratch (PyTorch's default initialisation makes a 15-layer ReLU stack's activations vanish).

    He initialisation keeps unit-variance inputs at unit variance; the network's input is in 0..255 units
    (mean-subtracted, standard deviation ≈ 64 on photos), so ``conv1_1`` is scaled down by ``input_scale`` = 64 to
    start every layer at unit scale (else the first steps' gradients are ~10⁴ times too large).
    """
    for layer in _backbone_layers(model):
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    model.conv1_1.weight.div_(input_scale)


@torch.no_grad()
def reset_class_layers(model: FCN8s) -> None:
    """Score layers to zero, deconvolutions to bilinear upsampling, CRF to its initial values (the FCN recipe)."""
    for layer in (model.score_fr, model.score_pool3, model.score_pool4):
        layer.weight.zero_()
        layer.bias.zero_()
    for layer in (model.upscore2, model.upscore_pool4, model.upscore8):
        layer.weight.copy_(bilinear_kernel(model.num_classes, layer.weight.shape[-1], dtype=layer.weight.dtype))
    model.upscore2.bias.zero_()
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


def read_state_dict(
    path: str | os.PathLike, *, num_classes_hint: int = 21, width_hint: float = 1.0
) -> tuple[dict, str]:
    """Read weights from ``path`` as an FCN-8s / CRF-RNN state_dict in our key names, and say what the file was.

    Kinds: ``"checkpoint"`` (written by ``crfasrnn train``), ``"torchvision-vgg16"``, ``"state_dict"`` (our own
    key names), or whatever :func:`crfasrnn.weights.load_weights` reads (``"weights"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = None
    if path.suffix not in (".safetensors", ".caffemodel"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch file: let load_weights try
            obj = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "args" in obj:
        return dict(obj["model"]), "checkpoint"
    if isinstance(obj, dict) and is_torchvision_vgg16(obj):
        return convert_torchvision_vgg16(obj), "torchvision-vgg16"
    if isinstance(obj, dict) and "conv1_1.weight" in obj and not any(k.startswith("crfrnn.") for k in obj):
        return dict(obj), "state_dict"
    return _read_with_load_weights(path, num_classes_hint, width_hint), "weights"


def _read_with_load_weights(path: Path, num_classes: int, width: float) -> dict:
    """Any file :mod:`crfasrnn.weights` reads (Caffe, the port's .pth, our safetensors), converted to our keys."""
    from .weights import read_weights

    state, _ = read_weights(path)
    return state


def initialise_from_file(model: FCN8s, path: str | os.PathLike) -> InitReport:
    """Copy the weights in ``path`` into ``model`` where they fit (see the module docstring).

    The VGG/fc backbone must be complete and of the model's width. Class-dependent layers of another class count are
    re-initialised (score layers zero, deconvolutions bilinear, CRF at its initial values); layers the file lacks keep
    the model's values (e.g. the CRF when starting CRF-RNN training from an FCN checkpoint).

    Raises:
        ValueError: backbone tensors missing or of other shapes (e.g. another ``width``), or an unreadable file.
    """
    state, kind = read_state_dict(path, num_classes_hint=model.num_classes, width_hint=model.width)
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


def model_from_file(path: str | os.PathLike, *, num_iterations: int = 10) -> tuple[FCN8s, InitReport]:
    """Build the network a weights file holds (FCN-8s or CRF-RNN; class count and width read from the tensors) and
    load it, for evaluation. Training checkpoints, our state_dicts and anything ``load_weights`` reads are accepted."""
    from .models import CrfRnnNet

    state, kind = read_state_dict(path)
    if "conv1_1.weight" not in state or "score_fr.weight" not in state:
        raise ValueError(f"{path} ({kind}) holds no complete FCN-8s (no conv1_1 / score_fr tensors)")
    num_classes = int(state["score_fr.weight"].shape[0])
    width = state["conv1_1.weight"].shape[0] / 64
    has_crf = any(k.startswith("crf.") for k in state)
    model = CrfRnnNet(num_classes, num_iterations, width=width) if has_crf else FCN8s(num_classes, width=width)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"{path} ({kind}) lacks tensors: {', '.join(result.missing_keys[:5])}")
    report = InitReport(
        source=str(path), kind=kind, loaded=list(model.state_dict()), ignored=list(result.unexpected_keys)
    )
    return model, report
