"""Higher-order potentials (detections, superpixels): each term against a direct, slow implementation of its equations,
T iterations against a loop over the plain layer, zero weights = the plain layer, gradients, batching, back ends, the
compiled graph and the input checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crfasrnn import CrfRnn
from crfasrnn.higher_order import (
    Detections,
    HigherOrderPotentials,
    Superpixels,
    read_detections,
    slic_superpixels,
    superpixel_potts_term,
)

C, H, W = 3, 6, 7


def _inputs(batch=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(batch, C, H, W, generator=g, dtype=dtype) * 2
    image = torch.rand(batch, 3, H, W, generator=g, dtype=dtype) * 255
    return unary, image


def _detections(batch=2):
    boxes = [[(1, 1, 4, 5)], [(0, 0, 3, 3), (2.5, 1.2, 7, 6)]][:batch]
    labels = [[1], [2, 0]][:batch]
    scores = [[0.9], [0.5, 0.8]][:batch]
    return Detections.from_boxes(boxes, labels, scores, size=(H, W))


def _superpixels(batch=2, scales=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Superpixels.from_label_maps(torch.randint(0, 5, (batch, scales, H, W), generator=g))


def _layer(dtype=torch.float64, backend="torch", potential="mean", num_iterations=3, seed=2):
    crf = CrfRnn(
        C,
        num_iterations,
        theta_alpha=4.0,
        theta_beta=40.0,
        theta_gamma=2.0,
        backend=backend,
        detections=True,
        superpixel_scales=2,
        superpixel_potential=potential,
    ).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crf.higher_order.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=dtype) + 0.5)
    return crf


def _plain(crf: CrfRnn, num_iterations: int) -> CrfRnn:
    plain = CrfRnn(
        C,
        num_iterations,
        theta_alpha=crf.theta_alpha,
        theta_beta=crf.theta_beta,
        theta_gamma=crf.theta_gamma,
        backend=crf.backend,
    ).to(crf.compatibility.dtype)
    plain.load_state_dict({k: v for k, v in crf.state_dict().items() if not k.startswith("higher_order.")})
    return plain


# --- direct, slow implementations of the equations (loops over detections, pixels, labels and segments) -------------


def _slow_detection(p, y, dets: Detections, b, wx, wy, max_score=1.0, eps=1e-4):
    """caffe-tvg's loops for image b: p (C, H·W) marginals, y (D, 2) the previous Y marginals."""
    x = np.zeros_like(p)
    y_new = []
    for d in range(dets.labels.shape[1]):
        score = float(dets.scores[b, d])
        label = int(dets.labels[b, d])
        pixels = np.flatnonzero(dets.masks[b, d].numpy().reshape(-1))
        positive = min(score / max_score, 1 - eps)
        logits = [1 - positive, positive]
        y_mult = wy[label] * score / (len(pixels) + 1e-6)
        x_mult = wx[label] * score
        for i in pixels:
            logits[0] -= p[label, i] * y_mult
            logits[1] -= (1 - p[label, i]) * y_mult
            for lab in range(p.shape[0]):
                x[lab, i] -= (y[d][0] if lab == label else y[d][1]) * x_mult
        e = np.exp(np.array(logits) - max(logits))
        y_new.append(e / e.sum())
    return x, np.array(y_new).reshape(-1, 2)


def _slow_mean(u, segments, weights):
    """Σ_σ w_σ · mean of u over the pixel's segment: u (C, N), segments (S, N)."""
    out = np.zeros_like(u)
    for s, seg in enumerate(segments):
        for i in range(u.shape[1]):
            members = [j for j in range(u.shape[1]) if seg[j] == seg[i]]
            out[:, i] += weights[s] * u[:, members].mean(axis=1)
    return out


def _slow_potts(p, segments, gamma):
    """Σ_σ γ_σ[l] Π_{j in σ(i), j != i} p[l, j]: p (C, N), segments (S, N), gamma (S, C)."""
    out = np.zeros_like(p)
    for s, seg in enumerate(segments):
        for i in range(p.shape[1]):
            for lab in range(p.shape[0]):
                product = 1.0
                for j in range(p.shape[1]):
                    if j != i and seg[j] == seg[i]:
                        product *= p[lab, j]
                out[lab, i] += gamma[s, lab] * product
    return out


def _softmax(q):
    e = np.exp(q - q.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _slow_mean_field(crf: CrfRnn, unary, image, dets, sp, num_iterations):
    """The iterations as a loop: the pairwise message of q is ``q − plain_1(q)`` (the plain layer's fused operator,
    one iteration from q), the higher-order terms from the slow implementations above."""
    ho = crf.higher_order
    one = _plain(crf, 1)
    b = unary.shape[0]
    wx = ho.detection_x_weights.detach().numpy()
    wy = ho.detection_y_weights.detach().numpy()
    ws = ho.superpixel_weights.detach().numpy()
    u = unary.detach().numpy().reshape(b, C, -1)
    q = u.copy()
    y = [
        None if dets is None else [(1 - min(float(s), 1 - 1e-4), min(float(s), 1 - 1e-4)) for s in dets.scores[i]]
        for i in range(b)
    ]
    for _ in range(num_iterations):
        q_t = torch.from_numpy(q.reshape(unary.shape))
        message = (q_t - one(q_t, image).detach()).numpy().reshape(b, C, -1)
        q_next = u - message
        for i in range(b):
            p = _softmax(q[i])
            if dets is not None:
                x, y_next = _slow_detection(p, y[i], dets, i, wx, wy)
                q_next[i] += x
                y[i] = [tuple(r) for r in y_next]
            if sp is not None:
                segs = sp.segments[i].numpy().reshape(sp.num_scales, -1)
                if ho.superpixel_potential == "mean":
                    q_next[i] += _slow_mean(u[i], segs, ws)
                else:
                    q_next[i] += _slow_potts(p, segs, ws)
        q = q_next
    return q.reshape(unary.shape), y


# --- the terms and the iterations against the slow implementations --------------------------------------------------


@pytest.mark.parametrize("num_iterations", [1, 3])
@pytest.mark.parametrize("which", ["detections", "mean", "potts", "all"])
def test_mean_field_with_each_potential_equals_the_slow_equations(which, num_iterations):
    unary, image = _inputs()
    crf = _layer(potential="potts" if which == "potts" else "mean", num_iterations=num_iterations)
    dets = _detections() if which in ("detections", "all") else None
    sp = _superpixels() if which != "detections" else None
    out = crf(unary, image, dets, sp)
    expected, _ = _slow_mean_field(crf, unary, image, dets, sp, num_iterations)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-9, atol=1e-9)
    # and the potentials change the result (the comparison is not between two copies of the plain layer)
    assert (out - _plain(crf, num_iterations)(unary, image)).abs().max() > 0.05


def test_detection_marginals_equal_the_slow_equations():
    from crfasrnn.higher_order import mean_field_higher_order

    unary, image = _inputs()
    crf = _layer(num_iterations=3)
    dets = _detections()
    b = unary.shape[0]
    _, y_slow = _slow_mean_field(crf, unary, image, dets, None, 3)
    # the layer's lattices and matrices, through the public mean-field function
    from crfasrnn.crf import bilateral_features
    from crfasrnn.engine import kernel_lattice, position_lattice_tensors

    features = bilateral_features(image, crf.theta_alpha, crf.theta_beta)
    bilateral = kernel_lattice("bilateral", features, b, (H, W), torch.float64, "torch")
    spatial = position_lattice_tensors((H, W), crf.theta_gamma, None, unary.device, torch.float64, "torch")
    m = crf.compatibility
    mixing = [(m @ crf.spatial_weights).t(), (m @ crf.bilateral_weights).t()]
    u = unary.reshape(b, C, -1).transpose(1, 2).contiguous()
    _, y = mean_field_higher_order(u, [spatial, bilateral], mixing, [2, 2], 3, crf.higher_order, dets, None)
    for i in range(b):
        d = len(y_slow[i])
        np.testing.assert_allclose(y[i, :d].detach().numpy(), np.array(y_slow[i]), rtol=1e-9, atol=1e-12)
    assert torch.allclose(y.sum(-1), torch.ones(()).double())


def test_padding_detections_contribute_nothing():
    """A batch pads image 0 to two detections: its result equals image 0 alone, with one."""
    unary, image = _inputs()
    crf = _layer()
    dets = _detections()
    assert dets.labels.shape == (2, 2) and float(dets.scores[0, 1]) == 0 and not dets.masks[0, 1].any()
    batched = crf(unary, image, dets)
    alone = crf(unary[:1], image[:1], Detections.from_boxes([[(1, 1, 4, 5)]], [[1]], [[0.9]], size=(H, W)))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("potential", ["mean", "potts"])
def test_batch_equals_one_image_at_a_time(potential):
    unary, image = _inputs(batch=2)
    crf = _layer(potential=potential)
    dets, sp = _detections(), _superpixels()
    batched = crf(unary, image, dets, sp)
    for i in range(2):
        one_dets = Detections(dets.labels[i : i + 1], dets.scores[i : i + 1], dets.masks[i : i + 1])
        one_sp = Superpixels(sp.segments[i : i + 1], sp.num_segments)
        torch.testing.assert_close(batched[i : i + 1], crf(unary[i : i + 1], image[i : i + 1], one_dets, one_sp))


def test_zero_weights_give_the_plain_layer():
    unary, image = _inputs(dtype=torch.float32)
    crf = _layer(dtype=torch.float32, backend="auto", num_iterations=5)
    with torch.no_grad():
        for p in crf.higher_order.parameters():
            p.zero_()
    plain = _plain(crf, 5)
    torch.testing.assert_close(crf(unary, image, _detections(), _superpixels()), plain(unary, image), rtol=0, atol=2e-5)
    # and without higher-order inputs the layer is the plain one exactly (the fused operator)
    torch.testing.assert_close(crf(unary, image), plain(unary, image), rtol=0, atol=0)


def test_the_network_passes_the_potentials_to_its_crf():
    from crfasrnn import CrfRnnNet

    torch.manual_seed(0)
    crf = CrfRnn(C, 2, detections=True, superpixel_scales=2)
    net = CrfRnnNet(C, crf=crf, width=1 / 16).eval()
    x = torch.randn(2, 3, H, W) * 50
    dets, sp = _detections(), _superpixels()
    with torch.no_grad():
        out = net(x, dets, sp)
        torch.testing.assert_close(out, crf(net.unary(x), x, dets, sp))
        assert (out - net(x)).abs().max() > 1e-3  # and they take part


def test_a_plain_layer_has_the_plain_state_dict():
    assert list(CrfRnn(C).state_dict()) == ["spatial_weights", "bilateral_weights", "compatibility"]
    keys = set(CrfRnn(C, detections=True, superpixel_scales=3).state_dict())
    assert {"higher_order.detection_x_weights", "higher_order.superpixel_weights"} <= keys


@pytest.mark.parametrize("potential", ["mean", "potts"])
def test_gradcheck_float64_unary_and_every_weight(potential):
    unary, image = _inputs(batch=2)
    unary.requires_grad_(True)
    crf = _layer(potential=potential, num_iterations=2)
    dets, sp = _detections(), _superpixels()
    names = [n for n, _ in crf.named_parameters()]
    params = [p for _, p in crf.named_parameters()]

    def fn(u, *weights):
        return torch.func.functional_call(crf, dict(zip(names, weights)), (u, image, dets, sp))

    assert torch.autograd.gradcheck(fn, (unary, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(fn(unary, *params).square().sum(), params[3:])
    assert all(bool(g.abs().sum() > 0) for g in grads)  # every higher-order weight receives a gradient


def test_the_numba_back_end_equals_torch():
    pytest.importorskip("numba")
    unary, image = _inputs(dtype=torch.float32)
    torch_layer = _layer(dtype=torch.float32, backend="torch")
    numba_layer = _layer(dtype=torch.float32, backend="numba")
    dets, sp = _detections(), _superpixels()
    torch.testing.assert_close(
        numba_layer(unary, image, dets, sp), torch_layer(unary, image, dets, sp), atol=1e-4, rtol=1e-4
    )


def test_half_inputs_under_autocast_compute_in_float32():
    unary, image = _inputs(dtype=torch.float32)
    crf = _layer(dtype=torch.float32)
    dets, sp = _detections(), _superpixels()
    unary, image = unary.bfloat16(), image.bfloat16()
    expected = crf(unary.float(), image.float(), dets, sp)  # the same (rounded) inputs, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crf(unary, image, dets, sp)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


_COMPILE_SCRIPT = """
import json, torch
from crfasrnn import CrfRnn
from crfasrnn.higher_order import Detections, Superpixels
torch.manual_seed(0)
crf = CrfRnn(3, 3, theta_alpha=4.0, theta_beta=40.0, detections=True, superpixel_scales=2)
dets = Detections.from_boxes([[(1, 1, 4, 5)], [(0, 0, 3, 3), (2, 1, 7, 6)]], [[1], [2, 0]], [[0.9], [0.5, 0.8]],
                             size=(6, 7))
sp = Superpixels.from_label_maps(torch.randint(0, 5, (2, 2, 6, 7)))
unary, image = torch.randn(2, 3, 6, 7, requires_grad=True), torch.rand(2, 3, 6, 7) * 255
compiled = torch.compile(crf)
results = []
for fn in (compiled, crf):
    out = fn(unary, image, dets, sp)
    grads = torch.autograd.grad(out.square().sum(), [unary, *crf.parameters()])
    results.append([out.detach(), *grads])
compile_err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))
with torch.no_grad():
    exported = torch.export.export(crf, (unary.detach(), image, dets, sp))
    targets = sorted({str(n.target) for n in exported.graph.nodes if "crfasrnn" in str(n.target)})
    export_err = float((exported.module()(unary, image, dets, sp) - crf(unary, image, dets, sp)).abs().max())
print(json.dumps({"compile": compile_err, "export": export_err, "targets": targets}))
"""


def test_compiled_and_exported_equal_eager(tmp_path):
    """torch.compile of the layer with both potentials, forward and backward, and torch.export (Detections and
    Superpixels are pytree nodes), in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compile"] < 1e-4 and report["export"] < 1e-5, report
    assert report["targets"] == ["crfasrnn.lattice_build.default", "crfasrnn.lattice_filter.default"]


def test_potts_term_of_a_consistent_segment_and_of_a_single_pixel():
    """Hand-computed: a two-pixel segment passes each pixel the other's p; a one-pixel segment passes the empty
    product, 1."""
    p = torch.tensor([[[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]], dtype=torch.float64)  # (1, N=3, C=2)
    segments = torch.tensor([[[0, 0, 1]]])
    gamma = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    r = superpixel_potts_term(p.log(), segments, 2, gamma)
    expected = torch.tensor([[[2 * 0.6, 3 * 0.4], [2 * 0.8, 3 * 0.2], [2.0, 3.0]]], dtype=torch.float64)
    torch.testing.assert_close(r, expected)


# --- inputs -----------------------------------------------------------------------------------------------------------


def test_boxes_become_their_pixels_clipped_to_the_image():
    dets = Detections.from_boxes([[(-2, 4.5, 3.2, 99)], []], [[1], []], [[0.5], []], size=(H, W))
    assert dets.labels.shape == (2, 1)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[4:, 0:4] = True
    assert torch.equal(dets.masks[0, 0], expected)
    assert not dets.masks[1].any() and float(dets.scores[1, 0]) == 0


def test_superpixels_are_renumbered_per_map():
    maps = torch.tensor([[[10, 10], [30, 30]], [[7, 8], [9, 7]]])
    sp = Superpixels.from_label_maps(maps)
    assert sp.segments.shape == (1, 2, 2, 2) and sp.num_segments == 3
    assert sp.segments[0, 0].tolist() == [[0, 0], [1, 1]] and sp.segments[0, 1].tolist() == [[0, 1], [2, 0]]


def test_slic_superpixels_at_several_scales():
    pytest.importorskip("skimage")
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, 16:] = 200
    sp = slic_superpixels(image, (4, 16))
    assert sp.segments.shape == (1, 2, 24, 32)
    counts = [len(torch.unique(sp.segments[0, s])) for s in range(2)]
    assert counts[0] < counts[1] <= sp.num_segments
    for s in range(2):  # no segment crosses the colour edge
        left, right = set(sp.segments[0, s, :, :16].unique().tolist()), set(sp.segments[0, s, :, 16:].unique().tolist())
        assert not left & right


def test_read_detections_json_with_boxes_and_masks(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[2:4, 3:6] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {
                "detections": [
                    {"label": 2, "score": 0.7, "box": [0, 0, 2, 3]},
                    {"label": 1, "score": 1.5, "mask": "m.png"},
                ]
            }
        )
    )
    dets = read_detections(path, (H, W), num_classes=C)
    assert dets.labels.tolist() == [[2, 1]] and dets.scores[0].tolist() == pytest.approx([0.7, 1.5])
    assert int(dets.masks[0, 0].sum()) == 6 and torch.equal(dets.masks[0, 1], torch.from_numpy(mask > 0))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"a": 1}', "must hold a list"),
        ('[{"label": 1, "score": 0.5}]', "exactly one of box and mask"),
        ('[{"label": 9, "score": 0.5, "box": [0, 0, 2, 2]}]', "beyond the 3 classes"),
        ('[{"label": 1, "score": -1, "box": [0, 0, 2, 2]}]', "score must be a number > 0"),
        ('[{"label": 1, "score": 0.5, "box": [3, 0, 2, 2]}]', "empty or outside"),
        ('[{"label": 1, "score": 0.5, "box": [0, 0, 2]}]', "box must be"),
        ('[{"label": 1, "score": 0.5, "mask": "missing.png"}]', "cannot read mask"),
    ],
)
def test_bad_detection_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_detections(path, (H, W), num_classes=C)


def test_bad_higher_order_inputs_are_refused():
    unary, image = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="no detection potential"):
        CrfRnn(C)(unary, image, _detections())
    with pytest.raises(ValueError, match="no superpixel potential"):
        CrfRnn(C, detections=True)(unary, image, None, _superpixels())
    crf = CrfRnn(C, detections=True, superpixel_scales=3)
    with pytest.raises(ValueError, match="takes 3 superpixel scale"):
        crf(unary, image, None, _superpixels(scales=2))
    with pytest.raises(ValueError, match="label 5, beyond"):
        crf(unary, image, Detections.from_boxes([[(0, 0, 2, 2)], []], [[5], []], [[1.0], []], size=(H, W)))
    with pytest.raises(ValueError, match="detections are for 1 image"):
        crf(unary, image, Detections.from_boxes([[(0, 0, 2, 2)]], [[1]], [[1.0]], size=(H, W)))
    with pytest.raises(ValueError, match="must agree on"):
        Detections(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3), torch.zeros(1, 2, H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores of image 0 must be > 0"):
        Detections.from_boxes([[(0, 0, 2, 2)]], [[1]], [[0.0]], size=(H, W))
    with pytest.raises(ValueError, match="superpixel_potential"):
        HigherOrderPotentials(C, superpixel_scales=1, superpixel_potential="robust")
