"""The CRF-RNN network: a segmentation backbone with a :class:`~crfasrnn.crf.CrfRnn` on top, FCN-8s (Long, Shelhamer
and Darrell, CVPR 2015) in the published configuration.

:class:`CrfRnnNet` composes its two parts (``backbone`` + ``crf``) as torchvision's segmentation models do, so that
any backbone giving (B, C, H, W) logits can carry the CRF. :class:`FCN8s`'s layer names and shapes are those of the
PyTorch port (``sadeepj/crfasrnn_pytorch``, docs/reference.md §6.1-6.2): its state_dict keys equal those of the
port's backbone. The CRF's parameters are ours (``spatial_weights``, ``bilateral_weights``, ``compatibility``,
Caffe/paper sign).

State-dict layout (a deliberate choice: the keys follow the modules, as in torchvision): a CrfRnnNet's keys are its
backbone's under ``backbone.`` (``backbone.conv1_1.weight`` … ``backbone.upscore8.weight``) and the CRF's under
``crf.`` (``crf.spatial_weights``, ``crf.bilateral_weights``, ``crf.compatibility``); an FCN8s on its own keeps its
flat keys (``conv1_1.weight`` …). ``load_state_dict`` takes exactly this layout. The *flat* layout (the FCN-8s keys
next to ``crf.*``) is that of our files and training checkpoints written while CrfRnnNet subclassed FCN8s, and what
the published formats' key tables give; it is mapped to this layout in one place,
:func:`crfasrnn.weights.convert.compose_keys`, which the one loader (:mod:`crfasrnn.weights`, also for ``crfasrnn
train --init`` and ``--resume``) applies: every such file still loads. :mod:`crfasrnn.weights` reads the published
files and ours.

This module knows nothing about files: it only builds the networks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_iterations, check_same_device, check_tensor, require
from .crf import CrfRnn
from .errors import InputTypeError
from .higher_order import Detections, Superpixels

__all__ = ["FCN8s", "CrfRnnNet", "bilinear_kernel", "CROP_OFFSETS"]

#: Crop offsets of FCN-8s (score_pool4, score_pool3, upscore8), as Caffe's Crop layer derives them
#: (docs/reference.md §6.1).
CROP_OFFSETS = (5, 9, 31)

# (name, output channels at width 1) of the VGG-16 convolutions; a None entry is a 2×2 ceil-mode max-pool.
_VGG16 = (
    ("conv1_1", 64), ("conv1_2", 64), None,
    ("conv2_1", 128), ("conv2_2", 128), None,
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), None,
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), None,
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), None,
)  # fmt: skip


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def bilinear_kernel(channels: int, kernel_size: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """A (C, C, k, k) transposed-convolution weight that upsamples each channel bilinearly (zero between channels).

    The FCN initialisation of the deconvolutions (docs/reference.md §6.1): ``factor = (k + 1) // 2``, centre ``factor -
    0.5`` for even k (``factor - 1`` for odd k), ``filt[i, j] = (1 - |i - c| / factor) (1 - |j - c| / factor)``.

    Example:
        >>> bilinear_kernel(1, 4)[0, 0, 0]
        tensor([0.0625, 0.1875, 0.1875, 0.0625])
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=dtype, device=device)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    weight[idx, idx] = filt
    return weight


def _check_input(x: torch.Tensor, device: torch.device) -> None:
    layout = "a (B, 3, H, W) preprocessed image batch (mean-subtracted BGR)"
    check_tensor("x", x, layout=layout, ndim=4, kind="floating")
    require(x.shape[1] == 3, f"x must be {layout}, got shape {tuple(x.shape)}")
    check_same_device("x", x, "the model's parameters", device)


class FCN8s(nn.Module):
    """FCN-8s over VGG-16, as in the CRF-RNN references (docs/reference.md §6.1).

    ``conv1_1`` pads by 100, the max-pools use ``ceil_mode=True``, ``fc6``/``fc7`` are convolutions (7×7 and 1×1), and
    the three score maps are fused with the fixed crop offsets 5, 9 and 31 (no score scaling: the original FCN-8s, not
    the "at-once" variant). Dropout is element-wise with p = 0.5 as in Caffe (identity in eval mode).

    Initialisation (for training; published weights replace it): VGG and fc layers keep PyTorch's default
    initialisation, the score layers and ``upscore2``'s bias are zero, and the deconvolutions are bilinear upsamplers
    (:func:`bilinear_kernel`), as in FCN.

    Args:
        num_classes: number of labels C (21 for PASCAL VOC).
        width: scales every VGG/fc channel count (64·width … 4096·width, at least 1). 1.0 is the published
            architecture (134 M parameters); small widths such as 1/16 give fast models for tests and smoke training.

    Shape:
        - x: (B, 3, H, W) preprocessed image (mean-subtracted BGR, see :func:`crfasrnn.transforms.preprocess`),
          any H, W >= 1.
        - output: (B, C, H, W) logits.

    Example:
        >>> net = FCN8s(num_classes=21, width=1 / 32).eval()
        >>> net(torch.randn(1, 3, 37, 50)).shape
        torch.Size([1, 21, 37, 50])
    """

    def __init__(self, num_classes: int = 21, *, width: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
            raise ValueError(f"width must be a finite number > 0, got {width!r}")
        self.num_classes = num_classes
        self.width = float(width)

        in_ch = 3
        self._stages: list[list[str]] = [[]]
        for entry in _VGG16:
            if entry is None:
                self._stages.append([])
                continue
            name, base = entry
            out_ch = _scaled(base, width)
            setattr(self, name, nn.Conv2d(in_ch, out_ch, 3, padding=100 if name == "conv1_1" else 1))
            self._stages[-1].append(name)
            in_ch = out_ch
        self._stages.pop()  # the empty list after pool5
        pool3_ch = _scaled(256, width)
        pool4_ch = _scaled(512, width)
        fc_ch = _scaled(4096, width)

        self.fc6 = nn.Conv2d(in_ch, fc_ch, 7)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(fc_ch, fc_ch, 1)
        self.drop7 = nn.Dropout(0.5)

        self.score_fr = nn.Conv2d(fc_ch, num_classes, 1)
        self.score_pool3 = nn.Conv2d(pool3_ch, num_classes, 1)
        self.score_pool4 = nn.Conv2d(pool4_ch, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=True)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self._init_heads()

    @torch.no_grad()
    def _init_heads(self) -> None:
        for score in (self.score_fr, self.score_pool3, self.score_pool4):
            nn.init.zeros_(score.weight)
            if score.bias is not None:  # (always: the score layers have biases)
                nn.init.zeros_(score.bias)
        if self.upscore2.bias is not None:
            nn.init.zeros_(self.upscore2.bias)
        for deconv in (self.upscore2, self.upscore_pool4, self.upscore8):
            w = deconv.weight
            w.copy_(bilinear_kernel(self.num_classes, w.shape[-1], dtype=w.dtype, device=w.device))

    def forward_fcn(self, x: torch.Tensor) -> torch.Tensor:
        """The FCN-8s logits (B, C, H, W) of a preprocessed batch ``x`` (B, 3, H, W)."""
        _check_input(x, self.score_fr.weight.device)
        height, width = x.shape[2:]
        h = x
        pools = []
        for names in self._stages:
            for name in names:
                h = F.relu(getattr(self, name)(h), inplace=True)
            h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]

        h = self.drop6(F.relu(self.fc6(h), inplace=True))
        h = self.drop7(F.relu(self.fc7(h), inplace=True))
        h = self.upscore2(self.score_fr(h))  # 1/16
        h = h + _crop(self.score_pool4(pool4), CROP_OFFSETS[0], h.shape[2:], "score_pool4")
        h = self.upscore_pool4(h)  # 1/8
        h = h + _crop(self.score_pool3(pool3), CROP_OFFSETS[1], h.shape[2:], "score_pool3")
        return _crop(self.upscore8(h), CROP_OFFSETS[2], (height, width), "upscore8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W) of a preprocessed batch ``x`` (B, 3, H, W)."""
        return self.forward_fcn(x)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, width={self.width:g}"


def _crop(t: torch.Tensor, offset: int, size, name: str) -> torch.Tensor:
    h, w = int(size[0]), int(size[1])
    if t.shape[2] < offset + h or t.shape[3] < offset + w:  # pragma: no cover - cannot happen for FCN-8s geometry
        raise RuntimeError(f"{name} output {tuple(t.shape)} too small to crop {h}×{w} at offset {offset}")
    return t[:, :, offset : offset + h, offset : offset + w]


class CrfRnnNet(nn.Module):
    """CRF-RNN (Zheng et al., ICCV 2015): a segmentation backbone's logits refined by :class:`~crfasrnn.crf.CrfRnn`.

    A composition, as torchvision's segmentation models (``backbone`` + head): ``self.backbone`` maps the preprocessed
    batch to logits, which are the CRF's unary scores, and ``self.crf`` refines them. The backbone may be any
    ``nn.Module`` mapping a (B, 3, H, W) preprocessed batch to (B, C, H, W) logits; by default it is :class:`FCN8s`,
    which with 21 classes, ``width=1`` and 10 iterations is the published network.

    The CRF's bilateral colour features are the preprocessed input itself (mean-subtracted BGR), exactly as in the
    Caffe original and the PyTorch port, so ``theta_beta = 3`` is in those units.

    State dict: ``backbone.*`` (the backbone's own keys, e.g. ``backbone.conv1_1.weight``) and ``crf.*``; see the
    module docstring for the files of the flat layout.

    Args:
        num_classes: number of labels C (21 for PASCAL VOC, the default for the default backbone). With a ``crf`` or a
            backbone that has a ``num_classes`` attribute it may be left out; every count given must agree.
        num_iterations: mean-field iterations of the default CRF (10 when left out; 5 in training, 10 at test time in
            the paper; 0 gives the backbone's logits). Read from ``self.crf.num_iterations`` at call time, so it may
            be changed on a built model (:attr:`num_iterations`).
        width: channel scale of the default backbone (1.0 when left out), see :class:`FCN8s`; not with ``backbone``.
        backbone: the network giving the logits (default: ``FCN8s(num_classes, width=width)``).
        crf: the CRF layer (default: ``CrfRnn(num_classes, num_iterations, **crf_kwargs)``); ``num_iterations`` and
            ``crf_kwargs`` configure the default one only.
        **crf_kwargs: keyword options of the default :class:`~crfasrnn.crf.CrfRnn` (bandwidths, initial kernel
            weights, backend).

    Raises:
        ValueError: class counts that disagree (or none to be had from a backbone without ``num_classes``),
            ``width`` with a backbone, ``num_iterations`` or CRF options with a ``crf``, bad values.
        TypeError: a backbone that is not an ``nn.Module``, a crf that is not a ``CrfRnn``.

    Shape:
        - x: (B, 3, H, W) preprocessed image batch, any H, W >= 1 (that the backbone takes).
        - output: (B, C, H, W) logits (unnormalised).

    Example:
        >>> net = CrfRnnNet(num_classes=21, num_iterations=2, width=1 / 32).eval()
        >>> with torch.no_grad():
        ...     out = net(torch.randn(1, 3, 24, 30) * 50)
        >>> out.shape, type(net.backbone).__name__
        (torch.Size([1, 21, 24, 30]), 'FCN8s')
        >>> tiny = CrfRnnNet(backbone=nn.Conv2d(3, 4, 1), num_classes=4, num_iterations=1)
        >>> tiny(torch.randn(2, 3, 8, 9) * 50).shape
        torch.Size([2, 4, 8, 9])
    """

    def __init__(
        self,
        num_classes: int | None = None,
        num_iterations: int | None = None,
        *,
        width: float | None = None,
        backbone: nn.Module | None = None,
        crf: CrfRnn | None = None,
        **crf_kwargs: Any,
    ) -> None:
        super().__init__()
        if backbone is not None and not isinstance(backbone, nn.Module):
            raise InputTypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if crf is not None and not isinstance(crf, CrfRnn):
            raise InputTypeError(f"crf must be a CrfRnn, got {type(crf).__name__}")
        if backbone is not None and width is not None:
            raise ValueError("width scales the default FCN8s backbone: it does not apply to a given backbone")
        if crf is not None and (num_iterations is not None or crf_kwargs):
            given = ["num_iterations"] * (num_iterations is not None) + sorted(crf_kwargs)
            raise ValueError(f"{', '.join(given)} configure the default CRF: set them on the CrfRnn given as crf")
        num_classes = _resolve_classes(num_classes, backbone, crf)
        if backbone is None:
            backbone = FCN8s(num_classes, width=1.0 if width is None else width)
        if crf is None:
            crf = CrfRnn(num_classes, 10 if num_iterations is None else num_iterations, **crf_kwargs)
        self.backbone = backbone
        self.crf = crf

    @property
    def num_classes(self) -> int:
        """Number of labels C (the CRF's)."""
        return self.crf.num_classes

    @property
    def width(self) -> float | None:
        """Channel scale of the backbone (:class:`FCN8s`'s ``width``); None for a backbone without one."""
        width = getattr(self.backbone, "width", None)
        return None if width is None else float(width)

    @property
    def num_iterations(self) -> int:
        """Mean-field iterations of the CRF (settable)."""
        return self.crf.num_iterations

    @num_iterations.setter
    def num_iterations(self, value: int) -> None:
        self.crf.num_iterations = check_iterations(value)

    def unary(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's logits (B, C, H, W) of a preprocessed batch ``x`` (B, 3, H, W): the CRF's unary scores."""
        _check_input(x, self.crf.compatibility.device)
        logits = self.backbone(x)
        expected = (x.shape[0], self.num_classes, x.shape[2], x.shape[3])
        check_tensor("the backbone's logits", logits, layout="(B, C, H, W)", ndim=4, kind="floating")
        require(
            logits.shape[0] == expected[0]
            and logits.shape[1] == expected[1]
            and logits.shape[2] == expected[2]
            and logits.shape[3] == expected[3],
            f"the backbone's logits must be (B, C, H, W) = {expected} for x of shape {tuple(x.shape)} and "
            f"{self.num_classes} classes, got {tuple(logits.shape)}",
        )
        return logits

    def forward_fcn(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's logits: :meth:`unary` (the name of the versions whose CrfRnnNet was an FCN8s)."""
        return self.unary(x)

    def forward(
        self, x: torch.Tensor, detections: Detections | None = None, superpixels: Superpixels | None = None
    ) -> torch.Tensor:
        """CRF-RNN logits (B, C, H, W) of a preprocessed batch ``x`` (B, 3, H, W); ``detections`` and
        ``superpixels`` (at the size of ``x``) go to a CRF built with higher-order potentials
        (:mod:`crfasrnn.higher_order`), for joint training with them."""
        unary = self.unary(x)
        if self.crf.num_iterations == 0:
            return unary
        if detections is None and superpixels is None:
            return self.crf(unary, x.to(unary.dtype))
        return self.crf(unary, x.to(unary.dtype), detections, superpixels)

    def extra_repr(self) -> str:
        width = self.width
        return f"num_classes={self.num_classes}" + ("" if width is None else f", width={width:g}")


def _resolve_classes(num_classes: int | None, backbone: nn.Module | None, crf: CrfRnn | None) -> int:
    """The class count of a CrfRnnNet: the one given, the crf's and the backbone's (``num_classes``), all agreeing."""
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    counts = {"num_classes": num_classes, "the crf": None if crf is None else crf.num_classes}
    if backbone is not None:
        own = getattr(backbone, "num_classes", None)
        counts["the backbone"] = own if isinstance(own, int) and not isinstance(own, bool) else None
    known = {name: count for name, count in counts.items() if count is not None}
    if len(set(known.values())) > 1:
        said = ", ".join(f"{name} {count}" for name, count in known.items())
        raise ValueError(f"the class counts disagree: {said}")
    if known:
        return next(iter(known.values()))
    if backbone is None:
        return 21
    raise ValueError(
        f"num_classes is needed: the backbone ({type(backbone).__name__}) has no num_classes attribute and no crf "
        "is given"
    )
