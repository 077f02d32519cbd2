"""crfasrnn.refine: the unary from labels or probabilities, the refinement itself, its inputs and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from crfasrnn import CrfRnn
from crfasrnn.refine import refine, unary_from_labels, unary_from_probs


def two_halves(h=24, w=32, edge=16):
    """A photo of two flat halves (an edge at column ``edge``) and its true labels."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, edge:] = (200, 180, 40)
    truth = (np.arange(w)[None].repeat(h, 0) >= edge).astype(np.int64)
    return image, truth


# ------------------------------------------------------------------------------------------------- unary from labels


def test_unary_from_labels_hand_computed():
    labels = torch.tensor([[0, 3], [9, 1]])
    u = unary_from_labels(labels, 4, gt_prob=0.7, unknown_label=9)
    assert u.shape == (4, 2, 2) and u.dtype == torch.float32
    p = u.exp()
    torch.testing.assert_close(p[:, 0, 0], torch.tensor([0.7, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(p[:, 0, 1], torch.tensor([0.1, 0.1, 0.1, 0.7]))
    torch.testing.assert_close(p[:, 1, 0], torch.full((4,), 0.25))  # unknown: uniform
    torch.testing.assert_close(p[:, 1, 1], torch.tensor([0.1, 0.7, 0.1, 0.1]))
    # the energy pydensecrf's unary_from_labels builds is -log of these
    assert math.isclose(-float(u[0, 0, 0]), -math.log(0.7), rel_tol=1e-6)


def test_unary_from_labels_batch_equals_loop():
    labels = torch.randint(0, 3, (3, 5, 6))
    batch = unary_from_labels(labels, 3)
    assert batch.shape == (3, 3, 5, 6)
    for i in range(3):
        torch.testing.assert_close(batch[i], unary_from_labels(labels[i], 3))


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (torch.tensor([[0, 5]]), {}, "label value 5 is outside 0..2"),
        (torch.tensor([[0, -1]]), {}, "label value -1"),
        (torch.tensor([[0.0, 1.0]]), {}, "integer"),
        (torch.tensor([[0, 1]]), {"gt_prob": 1.0}, "gt_prob"),
        (torch.tensor([0, 1]), {}, r"\(H, W\)"),
    ],
)
def test_unary_from_labels_errors(labels, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        unary_from_labels(labels, 3, **kwargs)


# -------------------------------------------------------------------------------------------------- unary from probs


def test_unary_from_probs_upsamples_lower_resolution():
    first = torch.tensor([[0.9, 0.2]]).repeat(3, 1)
    probs = torch.stack([first, 1 - first])  # (C=2, H=3, W=2), at half the image's resolution
    u = unary_from_probs(probs, (6, 4))
    assert u.shape == (2, 6, 4)
    p = u.exp()
    torch.testing.assert_close(p.sum(0), torch.ones(6, 4))
    torch.testing.assert_close(p[0, :, 0], torch.full((6,), 0.9))  # border columns keep the source values
    torch.testing.assert_close(p[0, :, 3], torch.full((6,), 0.2))
    torch.testing.assert_close(p[0, :, 1], torch.full((6,), 0.9 * 0.75 + 0.2 * 0.25))  # bilinear in between


def test_unary_from_probs_clips_zeros():
    u = unary_from_probs(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert torch.isfinite(u).all() and math.isclose(float(u.min()), math.log(1e-5), rel_tol=1e-5)


@pytest.mark.parametrize(
    ("probs", "size", "match"),
    [
        (torch.tensor([[[0.5]], [[0.6]]]), None, "do not sum to 1.*normalize"),
        (torch.tensor([[[1.2]], [[-0.2]]]), None, "negative"),
        (torch.tensor([[[float("nan")]], [[0.5]]]), None, "NaN"),
        (torch.full((2, 4, 4), 0.5), (3, 3), "do not match the image"),
        (torch.full((2, 2, 8), 0.5), (8, 8), "do not match the image"),  # lower resolution, wrong aspect ratio
        (torch.ones(2, 2, dtype=torch.int64), None, "floating"),
    ],
)
def test_unary_from_probs_errors(probs, size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        unary_from_probs(probs, size)


def test_unary_from_probs_normalize():
    probs = torch.tensor([[[1.0, 3.0]], [[3.0, 1.0]]])
    torch.testing.assert_close(unary_from_probs(probs, normalize=True).exp(), probs / 4)
    with pytest.raises(ValueError, match="all 0"):
        unary_from_probs(torch.zeros(2, 1, 1), normalize=True)


# ------------------------------------------------------------------------------------------------------- refinement


def test_refine_is_the_crf_rnn_layer_with_potts_weights():
    """refine = CrfRnn(theta..., W_s = spatial_weight·I, W_b = bilateral_weight·I, compatibility −I) on log p."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(4), size=(20, 24)).transpose(2, 0, 1).astype(np.float32)
    labels, marginals = refine(
        image,
        probs=probs,
        num_iterations=4,
        theta_alpha=30,
        theta_beta=20,
        theta_gamma=2,
        spatial_weight=2,
        bilateral_weight=7,
        return_probs=True,
    )
    crf = CrfRnn(4, 4, theta_alpha=30, theta_beta=20, theta_gamma=2, spatial_weight=2, bilateral_weight=7)
    with torch.no_grad():
        logits = crf(torch.from_numpy(probs).log()[None], torch.from_numpy(image).permute(2, 0, 1)[None].float())
    np.testing.assert_allclose(marginals, logits.softmax(1)[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(labels, logits.argmax(1)[0].numpy())
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (20, 24)


def test_refine_without_iterations_is_the_unary_argmax():
    image, truth = two_halves()
    coarse = truth.copy()
    coarse[:, 10:20] = 255
    out = refine(image, labels=coarse, unknown_label=255, num_iterations=0)
    known = coarse != 255
    np.testing.assert_array_equal(out[known], coarse[known])


def test_potts_sign_pulls_towards_the_neighbours():
    """With the Potts model a pixel with no information takes its neighbours' label, and a flat image is smoothed."""
    image = np.full((15, 15, 3), 100, np.uint8)
    labels = np.full((15, 15), 2)
    labels[5:10, 5:10] = 255
    out = refine(image, labels=labels, num_classes=3, unknown_label=255)
    assert (out == 2).all()


def test_unknown_band_follows_the_image_edge():
    image, truth = two_halves(30, 40, edge=22)
    coarse = np.where(np.arange(40) >= 18, 1, 0)[None].repeat(30, 0)  # boundary 4 px off the edge
    coarse[:, 12:28] = 255
    out = refine(image, labels=coarse, unknown_label=255)
    np.testing.assert_array_equal(out, truth)


def test_refine_batch_equals_loop_and_input_kinds():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (2, 16, 20))
    batch = refine(images, labels=labels, num_classes=3, num_iterations=3)
    assert batch.shape == (2, 16, 20)
    for i in range(2):
        np.testing.assert_array_equal(batch[i], refine(images[i], labels=labels[i], num_classes=3, num_iterations=3))
    # a list of PIL images is a batch too; torch inputs give torch outputs
    pil = refine([Image.fromarray(im) for im in images], labels=labels, num_classes=3, num_iterations=3)
    np.testing.assert_array_equal(pil, batch)
    as_torch = refine(torch.from_numpy(images[0]), labels=torch.from_numpy(labels[0]), num_classes=3, num_iterations=3)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), batch[0])
    # an explicit batch of one keeps its batch axis
    assert refine(images[:1], labels=labels[:1], num_classes=3, num_iterations=1).shape == (1, 16, 20)


def test_refine_on_device_matches_cpu(device):
    image, truth = two_halves(30, 40, edge=22)
    probs = np.stack([1.0 - 0.6 * truth, 0.6 * truth + 0.0]).astype(np.float32)
    probs = probs / probs.sum(0)
    cpu = refine(image, probs=probs, num_iterations=5)
    out = refine(torch.from_numpy(image).to(device), probs=torch.from_numpy(probs).to(device), num_iterations=5)
    assert out.device.type == device.type
    np.testing.assert_array_equal(out.cpu().numpy(), cpu)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": np.zeros((10, 12), np.int64), "probs": np.full((2, 10, 12), 0.5, np.float32)}, "exactly one"),
        ({}, "exactly one"),
        ({"labels": np.zeros((10, 11), np.int64)}, "10x11.*do not match the image's 10x12"),
        ({"probs": np.full((2, 20, 24), 0.5, np.float32)}, "do not match the image"),
        ({"labels": np.array([[0, 7]]).repeat(10, 0).repeat(6, 1), "num_classes": 3}, "label value 7"),
        ({"probs": np.full((3, 10, 12), 0.5, np.float32)}, "do not sum to 1"),
        ({"probs": np.full((2, 10, 12), np.nan, np.float32)}, "NaN"),
        ({"probs": np.full((2, 10, 12), 0.5, np.float32), "num_classes": 3}, "num_classes=3 but probs have 2"),
        ({"labels": np.full((10, 12), 255), "unknown_label": 255}, "no known pixel"),
        ({"labels": np.full((10, 12), 5000)}, "5001 classes"),
        ({"labels": np.zeros((10, 12), np.int64), "theta_alpha": -1.0}, "theta_alpha"),
    ],
)
def test_refine_errors(kwargs, match):
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises((ValueError, TypeError), match=match):
        refine(image, **kwargs)


def test_refine_rejects_non_uint8_images():
    with pytest.raises(TypeError, match="uint8"):
        refine(np.zeros((4, 4, 3), np.float32), labels=np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        refine(np.zeros((4, 4), np.uint8), labels=np.zeros((4, 4), np.int64))


# ---------------------------------------------------------------------------------------- quality on a known truth


def synthetic_scene(seed: int, h: int = 96, w: int = 128):
    """Sharp-edged coloured shapes (disc, rectangle, triangle) on a background, with Gaussian texture noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.zeros((h, w), np.int64)
    truth[(yy - 40) ** 2 + (xx - 40) ** 2 < 26**2] = 1
    truth[(yy > 50) & (yy < 88) & (xx > 70) & (xx < 118)] = 2
    truth[(yy > 8) & (xx > 80) & (yy < 8 + (xx - 80))] = 3
    colours = np.array([[90, 110, 140], [200, 60, 50], [60, 170, 70], [230, 200, 60]], float)
    image = np.clip(colours[truth] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return image, truth


def coarse_noisy_probs(truth: np.ndarray, num_classes: int, seed: int, block: int = 8, noise: float = 1.0):
    """What a low-resolution network gives: the truth sampled every ``block`` pixels, as noisy softmax scores."""
    rng = np.random.default_rng(seed + 1000)
    small = truth[block // 2 :: block, block // 2 :: block]
    logits = 2.0 * np.eye(num_classes)[small].transpose(2, 0, 1) + noise * rng.normal(size=(num_classes,) + small.shape)
    probs = np.exp(logits)
    return (probs / probs.sum(0)).astype(np.float32)


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    return float(
        np.mean([((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum() for c in range(num_classes)])
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_raises_iou_on_a_synthetic_scene(seed):
    """Measured over seeds 0-7: mean IoU 70.7-79.1 % for the upsampled coarse probabilities, 100.0 % refined (gain
    >= 20.9 points). Asserted: a gain of at least 15 points and at least 95 % after refinement."""
    image, truth = synthetic_scene(seed)
    probs = coarse_noisy_probs(truth, 4, seed)  # (4, 12, 16): upsampled bilinearly by refine
    before = mean_iou(refine(image, probs=probs, num_iterations=0), truth, 4)
    after = mean_iou(refine(image, probs=probs), truth, 4)
    assert before < 0.85
    assert after - before >= 0.15, (before, after)
    assert after >= 0.95, (before, after)
