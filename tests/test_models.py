"""FCN-8s and CrfRnnNet: the port's state_dict layout (SPEC §6.2), the sizes of SPEC §6.1, crops, any input size."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from crfasrnn import CrfRnn
from crfasrnn.models import CROP_OFFSETS, CrfRnnNet, FCN8s, bilinear_kernel

# SPEC §6.2, as printed from the PyTorch port's CrfRnnNet().state_dict(), with the port's crfrnn.* replaced by ours.
_C = 21
SPEC_STATE_DICT = {
    "conv1_1.weight": (64, 3, 3, 3), "conv1_1.bias": (64,),
    "conv1_2.weight": (64, 64, 3, 3), "conv1_2.bias": (64,),
    "conv2_1.weight": (128, 64, 3, 3), "conv2_1.bias": (128,),
    "conv2_2.weight": (128, 128, 3, 3), "conv2_2.bias": (128,),
    "conv3_1.weight": (256, 128, 3, 3), "conv3_1.bias": (256,),
    "conv3_2.weight": (256, 256, 3, 3), "conv3_2.bias": (256,),
    "conv3_3.weight": (256, 256, 3, 3), "conv3_3.bias": (256,),
    "conv4_1.weight": (512, 256, 3, 3), "conv4_1.bias": (512,),
    "conv4_2.weight": (512, 512, 3, 3), "conv4_2.bias": (512,),
    "conv4_3.weight": (512, 512, 3, 3), "conv4_3.bias": (512,),
    "conv5_1.weight": (512, 512, 3, 3), "conv5_1.bias": (512,),
    "conv5_2.weight": (512, 512, 3, 3), "conv5_2.bias": (512,),
    "conv5_3.weight": (512, 512, 3, 3), "conv5_3.bias": (512,),
    "fc6.weight": (4096, 512, 7, 7), "fc6.bias": (4096,),
    "fc7.weight": (4096, 4096, 1, 1), "fc7.bias": (4096,),
    "score_fr.weight": (_C, 4096, 1, 1), "score_fr.bias": (_C,),
    "score_pool3.weight": (_C, 256, 1, 1), "score_pool3.bias": (_C,),
    "score_pool4.weight": (_C, 512, 1, 1), "score_pool4.bias": (_C,),
    "upscore2.weight": (_C, _C, 4, 4), "upscore2.bias": (_C,),
    "upscore8.weight": (_C, _C, 16, 16),
    "upscore_pool4.weight": (_C, _C, 4, 4),
}  # fmt: skip
SPEC_CRF = {"crf.spatial_weights": (_C, _C), "crf.bilateral_weights": (_C, _C), "crf.compatibility": (_C, _C)}


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_state_dict_matches_spec_full_width():
    with torch.device("meta"):  # 134 M parameters without allocating them
        fcn, net = FCN8s(), CrfRnnNet()
    assert _shapes(fcn) == SPEC_STATE_DICT
    assert _shapes(net) == {**SPEC_STATE_DICT, **SPEC_CRF}
    assert sum(p.numel() for p in fcn.parameters()) == sum(torch.Size(s).numel() for s in SPEC_STATE_DICT.values())


def test_width_scales_channels():
    net = FCN8s(num_classes=5, width=1 / 16)
    shapes = _shapes(net)
    assert shapes["conv1_1.weight"] == (4, 3, 3, 3)
    assert shapes["conv3_1.weight"] == (16, 8, 3, 3)
    assert shapes["fc6.weight"] == (256, 32, 7, 7)
    assert shapes["score_fr.weight"] == (5, 256, 1, 1)
    assert shapes["score_pool3.weight"] == (5, 16, 1, 1)
    assert shapes["upscore8.weight"] == (5, 5, 16, 16)
    assert set(shapes) == set(SPEC_STATE_DICT)
    tiny = FCN8s(width=1e-6)  # at least one channel everywhere
    assert _shapes(tiny)["fc7.weight"] == (1, 1, 1, 1)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 2.0}, {"width": 0}, {"width": float("nan")}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FCN8s(**kwargs)


def test_intermediate_sizes_500():
    """SPEC §6.1's measured table for a 1×3×500×500 input (channel width does not change spatial sizes)."""
    net = FCN8s(width=1 / 64).eval()
    sizes = {}

    def out_hook(name):
        return lambda m, i, o: sizes.__setitem__(name, tuple(o.shape[2:]))

    def in_hook(name):
        return lambda m, i: sizes.__setitem__(name, tuple(i[0].shape[2:]))

    for name in (
        "conv1_1",
        "conv1_2",
        "fc6",
        "fc7",
        "score_fr",
        "upscore2",
        "score_pool4",
        "upscore_pool4",
        "score_pool3",
        "upscore8",
    ):
        getattr(net, name).register_forward_hook(out_hook(name))
    for pool, consumer in (
        ("pool1", "conv2_1"),
        ("pool2", "conv3_1"),
        ("pool3", "conv4_1"),
        ("pool4", "conv5_1"),
        ("pool5", "fc6"),
    ):
        getattr(net, consumer).register_forward_pre_hook(in_hook(pool))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 500, 500))
    expected = {
        "conv1_1": 698, "conv1_2": 698, "pool1": 349, "pool2": 175, "pool3": 88, "pool4": 44, "pool5": 22,
        "fc6": 16, "fc7": 16, "score_fr": 16, "upscore2": 34, "score_pool4": 44, "upscore_pool4": 70,
        "score_pool3": 88, "upscore8": 568,
    }  # fmt: skip
    assert sizes == {k: (v, v) for k, v in expected.items()}
    assert out.shape == (1, 21, 500, 500)


def _coord_map(layers):
    """Caffe's coordinate maps (crop_layer / coord_map.py): bottom coordinate = a · top coordinate + b."""
    a, b = Fraction(1), Fraction(0)
    for kind, k, s, p in layers:
        if kind == "conv":  # conv or pool: x_in = s x_out + (k-1)/2 - p
            a, b = a * s, a * (Fraction(k - 1, 2) - p) + b
        else:  # deconvolution, the inverse map
            a, b = a / s, b - a * (Fraction(k - 1, 2) - p) / s
    return a, b


def test_crop_offsets_follow_from_caffe_coordinate_maps():
    conv = lambda k=3, s=1, p=1: ("conv", k, s, p)  # noqa: E731
    pool = conv(2, 2, 0)
    to_pool3 = [conv(p=100), conv(), pool, conv(), conv(), pool, conv(), conv(), conv(), pool]
    to_pool4 = to_pool3 + [conv(), conv(), conv(), pool]
    to_score = to_pool4 + [conv(), conv(), conv(), pool, conv(7, 1, 0), conv(1, 1, 0), conv(1, 1, 0)]
    to_upscore2 = to_score + [("deconv", 4, 2, 0)]
    to_upscore_pool4 = to_upscore2 + [("deconv", 4, 2, 0)]
    to_upscore8 = to_upscore_pool4 + [("deconv", 16, 8, 0)]
    # data coordinate of position 0 of each blob; the crop offset is the difference expressed in the cropped blob.
    for cropped, reference, offset in (
        (to_pool4 + [conv(1, 1, 0)], to_upscore2, CROP_OFFSETS[0]),
        (to_pool3 + [conv(1, 1, 0)], to_upscore_pool4, CROP_OFFSETS[1]),
        (to_upscore8, [], CROP_OFFSETS[2]),
    ):
        a_c, b_c = _coord_map(cropped)
        a_r, b_r = _coord_map(reference)
        assert a_c == a_r  # same scale, so a pure translation
        assert (b_r - b_c) / a_c == offset
    assert CROP_OFFSETS == (5, 9, 31)


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (33, 64), (101, 49)])
def test_any_input_size(size):
    net = FCN8s(num_classes=3, width=1 / 32).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, *size)).shape == (2, 3, *size)


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # fan-in scaled, so that logits stay of order 1..10
            std = (p[0].numel() ** -0.5) if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_crfrnnnet_composes_fcn_and_crf():
    torch.manual_seed(0)
    net = CrfRnnNet(num_classes=4, num_iterations=3, width=1 / 32).eval()
    _randomise(net)
    x = torch.randn(2, 3, 20, 27) * 60
    with torch.no_grad():
        fcn = net.forward_fcn(x)
        out = net(x)
        crf = CrfRnn(4, 3)
        crf.load_state_dict(net.crf.state_dict())
        assert torch.allclose(out, crf(fcn, x), atol=1e-5)
        assert not torch.allclose(out, fcn)
        net.num_iterations = 0
        assert net.crf.num_iterations == 0
        assert torch.equal(net(x), fcn)  # 0 iterations: the FCN's own logits
        plain = FCN8s(num_classes=4, width=1 / 32).eval()
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("crf.")})
        assert torch.equal(plain(x), fcn)


def test_batch_equals_loop():
    net = CrfRnnNet(num_classes=3, num_iterations=2, width=1 / 32).eval()
    _randomise(net, 1)
    x = torch.randn(3, 3, 17, 22) * 60
    with torch.no_grad():
        batched = net(x)
        looped = torch.cat([net(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, looped, rtol=1e-4, atol=1e-4)


def test_initial_heads_and_bilinear_kernel():
    net = FCN8s(num_classes=2, width=1 / 32)
    assert torch.count_nonzero(net.score_fr.weight) == 0 and torch.count_nonzero(net.upscore2.bias) == 0
    k4 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(net.upscore2.weight[1, 1], k4[:, None] * k4[None, :])
    assert torch.count_nonzero(net.upscore2.weight[0, 1]) == 0
    # a bilinear deconvolution reproduces a constant image away from the borders
    up = torch.nn.functional.conv_transpose2d(torch.ones(1, 2, 6, 6), bilinear_kernel(2, 16), stride=8)
    assert torch.allclose(up[0, :, 16:-16, 16:-16], torch.ones(1))
    assert bilinear_kernel(1, 3)[0, 0].tolist() == [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]


def test_bad_input_messages():
    net = FCN8s(num_classes=2, width=1 / 32)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 8, 8\)"):
        net(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_backward_reaches_backbone():
    net = CrfRnnNet(num_classes=3, num_iterations=1, width=1 / 32)
    _randomise(net, 2)
    net(torch.randn(1, 3, 16, 16) * 50).logsumexp(1).mean().backward()
    assert net.conv1_1.weight.grad is not None and net.conv1_1.weight.grad.abs().sum() > 0
    assert net.crf.compatibility.grad is not None
