"""The dense-CRF loss (crfasrnn.losses): rloss's formula and API, the exact Gaussian on tiny images, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crfasrnn.engine import guided_features
from crfasrnn.lattice import PermutohedralLattice, numba_available
from crfasrnn.losses import DenseCRFLoss, dense_crf_loss

BACKENDS = ["torch"] + (["numba"] if numba_available() else [])


def _inputs(n=2, k=3, h=24, w=30, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), generator=g).to(dtype)
    # smooth-ish images so that the colour term matters: two regions with noise
    images[:, :, :, : w // 2] = images[:, :, :, : w // 2] * 0.2 + 40
    probs = torch.softmax(torch.randn(n, k, h, w, generator=g, dtype=dtype) * 2, dim=1)
    rois = (torch.rand(n, h, w, generator=g) > 0.3).to(dtype)
    return images, probs, rois


def _rloss_reference(images, probs, rois, sigma_rgb, sigma_xy, scale_factor=1.0):
    """rloss's DenseCRFLoss, written out as its code does it: scale (nearest / bilinear / nearest), mask, then per
    image and per class one lattice filtering (``lattice.compute(out, in, 1)``), ``-dot(S, AS) / N``; its gradient
    ``-2 AS / N`` masked by the ROI."""
    if scale_factor != 1.0:
        images = F.interpolate(images, scale_factor=scale_factor)
        probs = F.interpolate(probs, scale_factor=scale_factor, mode="bilinear", align_corners=False)
        rois = F.interpolate(rois[:, None], scale_factor=scale_factor)[:, 0]
        sigma_xy = sigma_xy * scale_factor
    n, k = probs.shape[:2]
    masked = probs * rois[:, None]
    filtered = torch.empty_like(masked)
    for i in range(n):
        lattice = PermutohedralLattice(guided_features(images[i : i + 1], sigma_xy, sigma_rgb), pad_to=4)
        for c in range(k):
            filtered[i, c] = lattice.filter(masked[i : i + 1, c : c + 1])[0, 0]
    loss = -(masked * filtered).sum() / n
    return loss, -2 * filtered / n * rois[:, None]


@pytest.mark.parametrize("scale_factor", [1.0, 0.5])
def test_equals_rloss_formula(scale_factor):
    images, probs, rois = _inputs(h=40, w=48)
    expected, expected_grad = _rloss_reference(images, probs, rois, 15.0, 20.0, scale_factor)
    probs = probs.clone().requires_grad_()
    loss = DenseCRFLoss(weight=1.0, sigma_rgb=15.0, sigma_xy=20.0, scale_factor=scale_factor)(images, probs, rois)
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(loss, probs)
    if scale_factor == 1.0:
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)  # rloss's -2 AS / N, masked
        exact = dense_crf_loss(images, probs, rois, sigma_xy=20.0, gradient="exact")
        (exact_grad,) = torch.autograd.grad(exact, probs)
        relative = (exact_grad - expected_grad).norm() / expected_grad.norm()
        assert 1e-4 < relative < 0.05, relative  # -(W + Wᵀ) S / N: the lattice's asymmetry (measured 0.019)


def _exact_loss(images, probs, rois, sigma_rgb, sigma_xy, normalized):
    """Brute force in float64: W_ij = exp(-|f_i - f_j|² / 2) over the scaled features."""
    n, k, h, w = probs.shape
    feats = guided_features(images.double(), sigma_xy, sigma_rgb).reshape(n, 5, h * w).transpose(1, 2)
    weights = torch.exp(-0.5 * torch.cdist(feats, feats) ** 2)
    if normalized:
        root = weights.sum(dim=2).rsqrt()
        weights = root[:, :, None] * weights * root[:, None, :]
    s = (probs.double() * rois.double()[:, None]).reshape(n, k, h * w)
    return -torch.einsum("bki,bij,bkj->b", s, weights, s)


@pytest.mark.parametrize("seed", range(3, 8))
def test_normalised_loss_approximates_the_exact_gaussian(seed):
    """Against the exact Gaussian on tiny images (9 x 11, d = 5): the lattice's relative error, measured 0.016-0.060
    over these seeds, is bounded by 0.1; a kernel of a quarter of the colour bandwidth is off by 0.6 or more."""
    images, probs, rois = _inputs(n=2, k=3, h=9, w=11, seed=seed)
    exact = _exact_loss(images, probs, rois, 60.0, 5.0, normalized=True)
    approx = dense_crf_loss(images, probs, rois, sigma_rgb=60.0, sigma_xy=5.0, normalized=True, reduction="none")
    assert float(((approx.double() - exact).abs() / exact.abs()).max()) < 0.1
    wrong = _exact_loss(images, probs, rois, 15.0, 5.0, normalized=True)
    assert float(((wrong - exact).abs() / exact.abs()).max()) > 0.5  # the comparison can tell


def test_unnormalised_loss_is_the_exact_one_up_to_the_lattice_constant():
    """The unnormalised lattice is c·W up to its approximation: the ratio to the exact loss is the same for any
    segmentation of the same image."""
    images, _, rois = _inputs(n=1, k=3, h=9, w=11, seed=4)
    ratios = []
    for seed in range(4):
        _, probs, _ = _inputs(n=1, k=3, h=9, w=11, seed=seed + 10)
        exact = _exact_loss(images, probs, rois, 60.0, 5.0, normalized=False)
        ratios.append(float(dense_crf_loss(images, probs, rois, sigma_rgb=60.0, sigma_xy=5.0)) / float(exact))
    spread = (max(ratios) - min(ratios)) / (sum(ratios) / len(ratios))
    assert spread < 0.03, ratios


def test_pixels_outside_the_roi_take_no_part():
    images, probs, rois = _inputs()
    changed = torch.where(rois[:, None].bool(), probs, torch.rand_like(probs))
    probs, changed = probs.requires_grad_(), changed.requires_grad_()
    a = dense_crf_loss(images, probs, rois, sigma_xy=10.0)
    b = dense_crf_loss(images, changed, rois, sigma_xy=10.0)
    torch.testing.assert_close(a, b)
    (grad,) = torch.autograd.grad(b, changed)
    assert bool((grad[~rois[:, None].expand_as(grad).bool()] == 0).all())
    full = dense_crf_loss(images, probs, None, sigma_xy=10.0)
    assert not torch.isclose(full, a)  # without a ROI every pixel counts


def test_batch_equals_loop_and_reductions():
    images, probs, rois = _inputs(n=3)
    each = torch.stack([dense_crf_loss(images[i : i + 1], probs[i : i + 1], rois[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(dense_crf_loss(images, probs, rois, reduction="none"), each)
    torch.testing.assert_close(dense_crf_loss(images, probs, rois), each.mean())
    torch.testing.assert_close(dense_crf_loss(images, probs, rois, reduction="sum", weight=2.0), 2 * each.sum())


def test_scale_factor_is_rlosss_down_scaling():
    images, probs, rois = _inputs(h=40, w=48)
    small = dense_crf_loss(
        F.interpolate(images, scale_factor=0.5),
        F.interpolate(probs, scale_factor=0.5, mode="bilinear", align_corners=False),
        F.interpolate(rois[:, None], scale_factor=0.5)[:, 0],
        sigma_xy=50.0,
    )
    torch.testing.assert_close(dense_crf_loss(images, probs, rois, sigma_xy=100.0, scale_factor=0.5), small)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_numba_equals_torch_back_end():
    images, probs, rois = _inputs()
    a = dense_crf_loss(images, probs, rois, backend="numba")
    b = dense_crf_loss(images, probs, rois, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalized", [False, True])
def test_gradcheck_float64(backend, normalized):
    images, probs, rois = _inputs(n=2, k=2, h=6, w=7, dtype=torch.float64)
    probs.requires_grad_()
    torch.autograd.gradcheck(
        lambda p: dense_crf_loss(
            images, p, rois, sigma_xy=3.0, normalized=normalized, backend=backend, gradient="exact"
        ),
        (probs,),
    )


def test_half_inputs_are_computed_in_float32():
    images, probs, rois = _inputs()
    reference = dense_crf_loss(images, probs, rois)
    half = dense_crf_loss(images, probs.half(), rois)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), reference, rtol=2e-3, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = dense_crf_loss(images, probs.bfloat16(), rois)
    assert under.dtype == torch.float32  # as torch's precision-sensitive operations under autocast


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda i, p, r: (i[:, :2], p, r), ValueError, r"images must be \(N, 3, H, W\)"),
        (lambda i, p, r: (i, p[0], r), ValueError, "segmentations must be"),
        (lambda i, p, r: (i, p, r[:, :-1]), ValueError, "rois must be"),
        (lambda i, p, r: (i, p.long(), r), TypeError, "segmentations must be a floating tensor"),
        (lambda i, p, r: (i, p.masked_fill(p > 0.9, float("nan")), r), ValueError, "NaN or Inf"),
        (lambda i, p, r: (i / 255 - 0.5, p, r), ValueError, "colours in 0..255"),
        (lambda i, p, r: (i.masked_fill(i > 250, float("nan")), p, r), ValueError, r"images \(.*\) contains NaN"),
        (lambda i, p, r: (i, p, r * 2), ValueError, "only 0"),
    ],
    ids=["image-shape", "seg-ndim", "roi-shape", "seg-dtype", "nan", "normalised-image", "nan-image", "roi-values"],
)
def test_bad_inputs_are_one_clear_error(change, error, match):
    images, probs, rois = _inputs()
    with pytest.raises(error, match=match):
        dense_crf_loss(*change(images, probs, rois))


def test_bad_parameters():
    images, probs, rois = _inputs()
    with pytest.raises(ValueError, match="sigma_xy must be a finite number > 0"):
        dense_crf_loss(images, probs, rois, sigma_xy=0.0)
    with pytest.raises(ValueError, match="reduction must be"):
        dense_crf_loss(images, probs, rois, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale_factor"):
        DenseCRFLoss(1.0, 15.0, 100.0, -0.5)


def test_compiled_equals_eager():
    images, probs, rois = _inputs()

    def loss(p):
        return dense_crf_loss(images, p, rois, sigma_xy=10.0)

    compiled = torch.compile(loss)
    p = probs.clone().requires_grad_()
    q = probs.clone().requires_grad_()
    eager, fast = loss(p), compiled(q)
    torch.testing.assert_close(fast, eager)
    eager.backward()
    fast.backward()
    torch.testing.assert_close(q.grad, p.grad)
