"""Our own weights format: the tensors of :class:`~crfasrnn.models.CrfRnnNet` (or FCN8s) with metadata.

The tensors are those of the model's state_dict: a CrfRnnNet's composed keys (``backbone.*``, ``crf.*``), an FCN8s's
flat ones. Files written while CrfRnnNet subclassed FCN8s have flat keys next to ``crf.*``; the loader maps them
(:func:`~crfasrnn.weights.convert.compose_keys`), and :func:`save_weights` writes a flat CRF-RNN state_dict it is
given in the composed layout.

* ``.safetensors`` (recommended): the state_dict, with the metadata as JSON under the ``crfasrnn`` key of the header;
  readable by any safetensors tool.
* any other suffix: ``torch.save({"format": "crfasrnn", "state_dict": ..., "metadata": ...})``, readable with
  ``weights_only=True``.

The metadata (:func:`default_metadata`, overridable by the caller) records the architecture, class count and names,
the channel ``width``, the reference preprocessing, the published file a conversion came from (``source_file`` /
``source_sha256`` / ``source_format``) and, for the published architecture, the paper's result. :class:`WeightsInfo`
is what a reader returns about a file; :func:`metadata_width` is the checked width a network is built with.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..files import atomic_write
from ..models import CrfRnnNet
from ..transforms import NETWORK_SIZE, VOC_CLASSES, VOC_MEAN_RGB
from .convert import compose_keys, fcn_key
from .errors import WeightsError

__all__ = [
    "PAPER",
    "WeightsInfo",
    "architecture_of",
    "width_of",
    "default_metadata",
    "metadata_width",
    "file_digest",
    "file_sha256",
    "save_weights",
]

#: The paper's reference result for the published model (Zheng et al., ICCV 2015).
PAPER = {
    "title": "Conditional Random Fields as Recurrent Neural Networks",
    "authors": "Zheng, Jayasumana, Romera-Paredes, Vineet, Su, Du, Huang, Torr",
    "venue": "ICCV 2015",
    "miou": 74.7,
    "miou_dataset": "PASCAL VOC 2012 test (CRF-RNN trained on VOC 2012 + COCO)",
}

Architecture = Literal["CrfRnnNet", "FCN8s"]


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """What was read: the file, its format and sha256, and the metadata that travels with the weights.

    ``metadata`` holds ``architecture``, ``classes`` (names), ``width``, ``preprocessing`` (mean, channel order,
    sizes), ``source_file`` / ``source_sha256`` / ``source_format`` (the published file it came from) and ``paper``
    (reference mIoU).
    """

    path: str
    #: "caffe-v1", "caffe-v2", "port-pth", "safetensors", "torch", "checkpoint" or "torchvision-vgg16"
    format: str
    sha256: str
    num_classes: int  #: 0 for a file without class layers (a VGG-16 backbone)
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


def architecture_of(keys: Mapping[str, Any]) -> Architecture:
    """``"CrfRnnNet"`` when a state_dict holds ``crf.*`` tensors, else ``"FCN8s"``.

    Example:
        >>> architecture_of({"score_fr.weight": 0, "crf.compatibility": 0}), architecture_of({"score_fr.weight": 0})
        ('CrfRnnNet', 'FCN8s')
    """
    return "CrfRnnNet" if any(k.startswith("crf.") for k in keys) else "FCN8s"


def higher_order_options(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~crfasrnn.crf.CrfRnn` options that a CRF-RNN state_dict's higher-order tensors imply (empty for
    a CRF without them): ``detections`` when it has detection weights, ``superpixel_scales`` and
    ``superpixel_potential`` from the superpixel weights' shape ((S,): the mean form, (S, C): Pⁿ-Potts).

    Example:
        >>> higher_order_options({"crf.higher_order.superpixel_weights": torch.zeros(3)})
        {'detections': False, 'superpixel_scales': 3, 'superpixel_potential': 'mean'}
    """
    prefix = "crf.higher_order."
    if not any(k.startswith(prefix) for k in state_dict):
        return {}
    weights = state_dict.get(prefix + "superpixel_weights")
    shape = tuple(weights.shape) if weights is not None else ()
    return {
        "detections": prefix + "detection_x_weights" in state_dict,
        "superpixel_scales": shape[0] if shape else 0,
        "superpixel_potential": "potts" if len(shape) == 2 else "mean",
    }


def width_of(state_dict: Mapping[str, torch.Tensor]) -> float:
    """The channel width the tensors imply: ``conv1_1``'s output channels / 64 (1.0 without ``conv1_1``).

    Either layout (an FCN8s's ``conv1_1.weight``, a CrfRnnNet's ``backbone.conv1_1.weight``). Only the metadata
    records a width exactly (e.g. 0.3 gives 19 channels, 19 / 64 = 0.297 gives other fc sizes): readers use this
    where a file records none.
    """
    key = fcn_key(state_dict, "conv1_1.weight")
    return 1.0 if key is None else state_dict[key].shape[0] / 64


def default_metadata(
    num_classes: int, *, width: float = 1.0, architecture: Architecture = "CrfRnnNet"
) -> dict[str, Any]:
    """The metadata of a model: VOC class names (for 21 classes), the reference preprocessing, the paper (for the
    published architecture: a CRF-RNN of 21 classes at width 1)."""
    meta: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": num_classes,
        "width": width,
        "preprocessing": {
            "resize": f"bilinear, longest side at most {NETWORK_SIZE}",
            "mean_rgb": list(VOC_MEAN_RGB),
            "subtract": "RGB mean, then channels flipped to BGR",
            "channel_order": "BGR",
            "pad_to": [NETWORK_SIZE, NETWORK_SIZE],
        },
    }
    if architecture == "CrfRnnNet":
        meta["num_iterations"] = 10
    if num_classes == len(VOC_CLASSES):
        meta["classes"] = list(VOC_CLASSES)
    if num_classes == len(VOC_CLASSES) and width == 1.0 and architecture == "CrfRnnNet":
        meta["paper"] = dict(PAPER)
    return meta


def metadata_width(info: WeightsInfo, default: float = 1.0) -> float:
    """The channel width a file's metadata records (``default`` where it records none), checked.

    Raises:
        ValueError: the width is not a finite number > 0 (the message names the file).
    """
    raw = info.metadata.get("width", default)
    try:
        width = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"weights {info.path}: the metadata's width must be a number, got {raw!r}") from None
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"weights {info.path}: the metadata's width must be a finite number > 0, got {raw!r}")
    return width


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest (``sha256``, ``sha1`` ...) of a file, read in 1 MiB chunks.

    The last few are remembered by the file's identity, size and modification time, so that the checks of a cached
    download and the loader that then reads it hash a 538 MB file once, not twice.
    """
    stat = os.stat(path)
    return _digest(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, algorithm)


@functools.lru_cache(maxsize=8)
def _digest(path: str, inode: int, size: int, mtime_ns: int, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (:func:`file_digest`)."""
    return file_digest(path, "sha256")


def save_weights(
    model: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: Mapping | None = None
) -> str:
    """Write a model's (or a state_dict's) weights in our format, with metadata, atomically; returns the sha256.

    ``.safetensors`` (recommended): the metadata is stored as JSON under the ``crfasrnn`` key of the header.
    Any other suffix: ``torch.save({"format": "crfasrnn", "state_dict": ..., "metadata": ...})``, readable with
    ``weights_only=True``. The default metadata comes from :func:`default_metadata`; ``metadata`` entries override it.

    The model is an FCN8s or a CrfRnnNet over one (the FCN-8s configuration the loader builds); a CRF-RNN
    state_dict of the flat layout is written in the composed one.
    """
    path = Path(path)
    state_dict = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    if architecture_of(state_dict) == "CrfRnnNet":
        state_dict = compose_keys(state_dict)
    score = fcn_key(state_dict, "score_fr.weight")
    if score is None:
        raise WeightsError(
            "cannot save: the state_dict has no 'score_fr.weight' (not a CRF-RNN / FCN-8s model; save the "
            "state_dict of a network over another backbone with torch.save)"
        )
    num_classes = int(state_dict[score].shape[0])
    width = getattr(model, "width", None)
    width = width_of(state_dict) if width is None else float(width)
    meta = {
        **default_metadata(num_classes, width=width, architecture=architecture_of(state_dict)),
        **dict(metadata or {}),
    }
    if isinstance(model, CrfRnnNet):
        meta["num_iterations"] = model.num_iterations
    text = json.dumps(meta, sort_keys=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt", "crfasrnn": text}))
    else:
        payload = {"format": "crfasrnn", "state_dict": state_dict, "metadata": json.loads(text)}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return file_sha256(path)
