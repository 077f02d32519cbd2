"""FCN-8s and CrfRnnNet: the port's state_dict layout (SPEC §6.2), the sizes of SPEC §6.1, crops, any input size;
CrfRnnNet as a composition (backbone + CRF): other backbones, its key layout, files of the flat layout."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from crfasrnn import CrfRnn
from crfasrnn.models import CROP_OFFSETS, CrfRnnNet, FCN8s, bilinear_kernel
from crfasrnn.weights import FLAT_KEYS, compose_keys, load_model, load_weights, state_dict_for

# SPEC §6.2, as printed from the PyTorch port's CrfRnnNet().state_dict(), with the port's crfrnn.* replaced by ours:
# the port's backbone keys (SPEC_STATE_DICT) next to the CRF's. Our CrfRnnNet composes the two (backbone + crf), so its
# backbone's state_dict is SPEC_STATE_DICT and its own holds the same tensors under backbone.* and crf.*.
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
    assert _shapes(net.backbone) == SPEC_STATE_DICT  # the backbone's state_dict is the port's backbone layout
    assert _shapes(net.crf) == {k.removeprefix("crf."): v for k, v in SPEC_CRF.items()}
    # the whole network: the port's tensors (crfrnn.* as ours), its backbone's under backbone.*
    assert _shapes(net) == {**{f"backbone.{k}": v for k, v in SPEC_STATE_DICT.items()}, **SPEC_CRF}
    assert compose_keys({**SPEC_STATE_DICT, **SPEC_CRF}) == _shapes(net)  # the one mapping from the flat layout
    assert sum(p.numel() for p in fcn.parameters()) == sum(torch.Size(s).numel() for s in SPEC_STATE_DICT.values())
    assert sum(p.numel() for p in net.parameters()) == sum(torch.Size(s).numel() for s in _shapes(net).values())


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
    assert not isinstance(net, FCN8s) and type(net.backbone) is FCN8s and isinstance(net.crf, CrfRnn)
    assert (net.num_classes, net.width, net.num_iterations) == (4, 1 / 32, 3)
    x = torch.randn(2, 3, 20, 27) * 60
    with torch.no_grad():
        fcn = net.unary(x)
        out = net(x)
        # the parts called by hand: the FCN-8s logits, then the CRF over them with the input as colours
        plain = FCN8s(num_classes=4, width=1 / 32).eval()
        plain.load_state_dict(net.backbone.state_dict())
        crf = CrfRnn(4, 3)
        crf.load_state_dict(net.crf.state_dict())
        assert torch.equal(plain(x), fcn) and torch.equal(net.forward_fcn(x), fcn)
        assert torch.equal(out, crf(plain(x), x))
        assert not torch.allclose(out, fcn)
        net.num_iterations = 0
        assert net.crf.num_iterations == 0
        assert torch.equal(net(x), fcn)  # 0 iterations: the FCN's own logits
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="num_iterations must be an integer >= 0"):
            net.num_iterations = bad


class _InheritedCrfRnnNet(FCN8s):
    """CrfRnnNet as version 0.1.0 defined it (an FCN8s subclass with a ``crf``): the flat key layout."""

    def __init__(self, num_classes: int, num_iterations: int, *, width: float) -> None:
        super().__init__(num_classes, width=width)
        self.crf = CrfRnn(num_classes, num_iterations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unary = self.forward_fcn(x)
        return unary if self.crf.num_iterations == 0 else self.crf(unary, x.to(unary.dtype))


def test_crfrnnnet_equals_the_inherited_network_and_takes_its_flat_state_dict():
    old = _InheritedCrfRnnNet(4, 3, width=1 / 32).eval()
    _randomise(old, 3)
    flat = old.state_dict()
    assert "conv1_1.weight" in flat and "crf.compatibility" in flat and not any(k.startswith("backbone.") for k in flat)
    net = CrfRnnNet(4, 3, width=1 / 32).eval()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*backbone\.conv1_1\.weight"):  # the layout is the new one
        net.load_state_dict(flat)
    assert set(compose_keys(flat)) == set(net.state_dict())
    net.load_state_dict(state_dict_for(net, flat))
    x = torch.randn(2, 3, 19, 26) * 60
    with torch.no_grad():
        assert torch.equal(net(x), old(x))
        assert torch.equal(net.unary(x), old.forward_fcn(x))
    # every FCN-8s layer of the flat layout is in the table, and nothing else
    assert {k.split(".")[0] for k in FCN8s(2, width=1 / 64).state_dict()} == set(FLAT_KEYS)


def test_flat_keyed_files_of_ours_load_as_the_same_model(tmp_path):
    """Files written before CrfRnnNet composed its backbone: safetensors with metadata, torch.save, a checkpoint."""
    import json

    from safetensors.torch import save_file

    old = _InheritedCrfRnnNet(4, 2, width=1 / 16).eval()
    _randomise(old, 4)
    flat = {k: v.contiguous() for k, v in old.state_dict().items()}
    meta = {"architecture": "CrfRnnNet", "num_classes": 4, "width": 1 / 16, "num_iterations": 2}
    save_file(flat, tmp_path / "old.safetensors", metadata={"format": "pt", "crfasrnn": json.dumps(meta)})
    torch.save({"format": "crfasrnn", "state_dict": flat, "metadata": meta}, tmp_path / "old.pt")
    torch.save({"model": flat, "args": {"width": 1 / 16}, "step": 3}, tmp_path / "last.pt")
    x = torch.randn(1, 3, 23, 31) * 60
    with torch.no_grad():
        expected = old(x)
    for name, fmt in (("old.safetensors", "safetensors"), ("old.pt", "torch"), ("last.pt", "checkpoint")):
        model, info = load_model(tmp_path / name, num_iterations=2)
        assert type(model) is CrfRnnNet and info.format == fmt and model.width == 1 / 16, name
        assert set(model.state_dict()) == set(compose_keys(flat))
        with torch.no_grad():
            assert torch.equal(model(x), expected), name
        into = CrfRnnNet(4, 2, width=1 / 16).eval()
        load_weights(into, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(into(x), expected), name
    # written again, a file has the composed layout
    from crfasrnn.weights import convert_weights, read_weights

    convert_weights(tmp_path / "old.safetensors", tmp_path / "new.safetensors")
    state_dict, _ = read_weights(tmp_path / "new.safetensors")
    assert set(state_dict) == set(CrfRnnNet(4, width=1 / 16).state_dict())


def test_a_custom_backbone_carries_the_crf_and_trains():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    net = CrfRnnNet(backbone=conv, num_classes=4, num_iterations=2)
    assert net.backbone is conv and net.width is None and net.num_classes == 4 and not isinstance(net, FCN8s)
    assert set(net.state_dict()) == {"backbone.weight", "backbone.bias", *SPEC_CRF}
    x = torch.rand(2, 3, 12, 15) * 255 - 120
    target = torch.randint(0, 4, (2, 12, 15))
    with torch.no_grad():
        assert torch.equal(net(x), net.crf(conv(x), x))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(net(x), target)
    loss.backward()
    for name, p in net.named_parameters():  # the gradients reach the backbone and the CRF's three matrices
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # the CRF may be given too; the class count then comes from it
    crf = CrfRnn(4, 1, theta_beta=5.0)
    net = CrfRnnNet(backbone=torch.nn.Conv2d(3, 4, 1), crf=crf)
    assert net.crf is crf and net.num_classes == 4 and net.num_iterations == 1
    assert net(x).shape == (2, 4, 12, 15)


def test_refused_configurations():
    fcn3 = FCN8s(3, width=1 / 64)
    with pytest.raises(ValueError, match="class counts disagree: num_classes 4, the backbone 3"):
        CrfRnnNet(4, backbone=fcn3)
    with pytest.raises(ValueError, match="class counts disagree: the crf 4, the backbone 3"):
        CrfRnnNet(backbone=fcn3, crf=CrfRnn(4))
    with pytest.raises(ValueError, match="class counts disagree: num_classes 3, the crf 5"):
        CrfRnnNet(3, crf=CrfRnn(5))
    with pytest.raises(ValueError, match="num_classes is needed: the backbone \\(Conv2d\\) has no num_classes"):
        CrfRnnNet(backbone=torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="width scales the default FCN8s backbone"):
        CrfRnnNet(3, backbone=fcn3, width=1 / 64)
    with pytest.raises(ValueError, match="num_iterations, theta_beta configure the default CRF"):
        CrfRnnNet(crf=CrfRnn(3), num_iterations=5, theta_beta=4.0)
    with pytest.raises(TypeError, match=r"backbone must be an nn\.Module, got function"):
        CrfRnnNet(3, backbone=lambda x: x)
    with pytest.raises(TypeError, match="crf must be a CrfRnn"):
        CrfRnnNet(3, crf=torch.nn.Identity())
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
            CrfRnnNet(bad, crf=CrfRnn(3))
    assert CrfRnnNet(3, backbone=fcn3).backbone is fcn3  # agreeing counts are fine
    # a backbone whose logits do not fit: named at the call, before the CRF
    net = CrfRnnNet(4, backbone=torch.nn.Conv2d(3, 5, 1), num_iterations=0)
    message = r"backbone's logits must be \(B, C, H, W\) = \(1, 4, 6, 7\) .* got \(1, 5, 6, 7\)"
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(1, 3, 6, 7))


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
    assert net.backbone.conv1_1.weight.grad is not None and net.backbone.conv1_1.weight.grad.abs().sum() > 0
    assert net.crf.compatibility.grad is not None
