"""The CRF-RNN layer: the reference case, gradients, batching, back ends, devices and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crfasrnn import CrfRnn, PermutohedralLattice, crf_rnn
from crfasrnn.crf import bilateral_features, spatial_features
from crfasrnn.lattice import NORMALISER_EPS


def _reference_layer(case, num_iterations: int, backend: str = "auto", device="cpu") -> CrfRnn:
    crf = CrfRnn(
        3,
        num_iterations,
        theta_alpha=float(case["theta_alpha"]),
        theta_beta=float(case["theta_beta"]),
        theta_gamma=float(case["theta_gamma"]),
        backend=backend,
    )
    with torch.no_grad():
        crf.spatial_weights.copy_(torch.from_numpy(case["spatial_ker_weights"]))
        crf.bilateral_weights.copy_(torch.from_numpy(case["bilateral_ker_weights"]))
        crf.compatibility.copy_(-torch.from_numpy(case["compatibility_matrix"]))  # the port's sign is opposite
    return crf.to(device)


def _inputs(case, device="cpu"):
    unary = torch.from_numpy(case["unary"])[None].to(device)
    image = torch.from_numpy(case["image_fed"])[None].to(device)
    return unary, image


def _assert_output_close(out: torch.Tensor, expected: np.ndarray) -> None:
    err = np.abs(out.detach().cpu().numpy().reshape(expected.shape) - expected)
    assert err.max() < 1e-3 and err.mean() < 1e-5, (err.max(), err.mean())


# --- the reference case -----------------------------------------------------------------------------------------------


def test_parameters_and_initialisation():
    crf = CrfRnn(4)
    names = dict(crf.named_parameters())
    assert set(names) == {"spatial_weights", "bilateral_weights", "compatibility"}
    for p in names.values():
        assert p.shape == (4, 4) and p.dtype == torch.float32 and p.requires_grad
    torch.testing.assert_close(crf.spatial_weights.data, 3.0 * torch.eye(4))
    torch.testing.assert_close(crf.bilateral_weights.data, 5.0 * torch.eye(4))
    torch.testing.assert_close(crf.compatibility.data, -torch.eye(4))
    assert crf.num_iterations == 5 and (crf.theta_alpha, crf.theta_beta, crf.theta_gamma) == (160.0, 3.0, 3.0)


def test_features_are_the_references(case_a):
    image = torch.from_numpy(case_a["image_fed"])[None]
    spatial = spatial_features(30, 40, float(case_a["theta_gamma"]), like=image)[0].permute(1, 2, 0).numpy()
    bilateral = bilateral_features(image, float(case_a["theta_alpha"]), float(case_a["theta_beta"]))[0]
    np.testing.assert_array_equal(spatial, case_a["spatial_features"])  # bit-identical: float32 division
    np.testing.assert_array_equal(bilateral.permute(1, 2, 0).numpy(), case_a["bilateral_features"])


def test_iteration_one_intermediates(case_a, device_backend):
    device, backend = device_backend
    unary, image = _inputs(case_a, device)
    spatial = PermutohedralLattice(spatial_features(30, 40, 3.0, like=image), backend=backend)
    bilateral = PermutohedralLattice(bilateral_features(image, 160.0, 3.0), backend=backend)
    ones = torch.ones(1, 1, 30, 40, device=device)
    norm_s = 1.0 / (spatial.filter(ones) + NORMALISER_EPS)
    norm_b = 1.0 / (bilateral.filter(ones) + NORMALISER_EPS)
    np.testing.assert_allclose(norm_s[0, 0].cpu().numpy(), case_a["spatial_norm"], rtol=1e-5)
    np.testing.assert_allclose(norm_b[0, 0].cpu().numpy(), case_a["bilateral_norm"], rtol=1e-5)
    p = F.softmax(unary, dim=1)
    _assert_output_close(p, case_a["iter1_softmax"])
    _assert_output_close(spatial.filter(p) * norm_s, case_a["iter1_spatial_filtered"])
    _assert_output_close(bilateral.filter(p) * norm_b, case_a["iter1_bilateral_filtered"])


def test_reference_outputs(case_a, device_backend):
    device, backend = device_backend
    unary, image = _inputs(case_a, device)
    with torch.no_grad():
        for t in range(1, 6):
            out = _reference_layer(case_a, t, backend, device)(unary, image)
            _assert_output_close(out, case_a["outputs_per_iteration"][t - 1])
        _assert_output_close(_reference_layer(case_a, 5, backend, device)(unary, image), case_a["output"])
        _assert_output_close(_reference_layer(case_a, 10, backend, device)(unary, image), case_a["output_10it"])


def test_reference_gradients(case_a, device_backend):
    device, backend = device_backend
    unary, image = _inputs(case_a, device)
    unary.requires_grad_(True)
    crf = _reference_layer(case_a, 5, backend, device)
    out = crf(unary, image)
    (out * torch.from_numpy(case_a["G"]).to(device)[None]).sum().backward()
    expected = {
        "unary": (unary.grad, case_a["grad_unary"]),
        "spatial_weights": (crf.spatial_weights.grad, case_a["grad_spatial_ker_weights"]),
        "bilateral_weights": (crf.bilateral_weights.grad, case_a["grad_bilateral_ker_weights"]),
        "compatibility": (crf.compatibility.grad, -case_a["grad_compatibility_matrix"]),
    }
    for name, (grad, ref) in expected.items():
        grad = grad.cpu().numpy().reshape(ref.shape)
        rel = np.abs(grad - ref).max() / np.abs(ref).max()
        assert rel < 1e-3, (name, rel)


# --- behaviour --------------------------------------------------------------------------------------------------------


def _random_inputs(batch, classes, height, width, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    unary = (2 * torch.randn(batch, classes, height, width, generator=g, dtype=dtype)).to(device)
    image = (255 * torch.rand(batch, 3, height, width, generator=g, dtype=dtype)).to(device)
    return unary, image


def test_zero_iterations_return_the_unary():
    unary, image = _random_inputs(2, 3, 5, 6)
    assert CrfRnn(3, 0)(unary, image) is unary


def test_batch_equals_loop(device_backend):
    device, backend = device_backend
    unary, image = _random_inputs(3, 4, 17, 13, device=device, seed=1)
    unary.requires_grad_(True)
    crf = CrfRnn(4, 3, theta_alpha=10.0, theta_beta=20.0, backend=backend).to(device)
    g = torch.randn(3, 4, 17, 13, device=device)
    batched = crf(unary, image)
    (batched * g).sum().backward()
    grads_batched = [p.grad.clone() for p in crf.parameters()]
    grad_unary_batched = unary.grad.clone()
    crf.zero_grad()
    unary.grad = None
    for i in range(3):
        alone = crf(unary[i : i + 1], image[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        (alone * g[i : i + 1]).sum().backward()
    torch.testing.assert_close(unary.grad, grad_unary_batched, rtol=1e-4, atol=1e-5)
    for p, gb in zip(crf.parameters(), grads_batched):
        torch.testing.assert_close(p.grad, gb, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    unary, image = _random_inputs(2, 3, 4, 5, torch.float64, device, seed=2)
    crf = CrfRnn(3, 2, theta_alpha=4.0, theta_beta=60.0, theta_gamma=2.0, backend=backend).double().to(device)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # generic, non-symmetric matrices
        for p in crf.parameters():
            p.add_(0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64).to(device))
    unary.requires_grad_(True)
    params = (unary, crf.spatial_weights, crf.bilateral_weights, crf.compatibility)

    def fn(u, ws, wb, m):
        return crf_rnn(
            u, image, ws, wb, m, num_iterations=2, theta_alpha=4.0, theta_beta=60.0, theta_gamma=2.0, backend=backend
        )

    assert torch.autograd.gradcheck(fn, params)


@pytest.mark.parametrize("potts", [False, True], ids=["dense", "potts"])
def test_gradients_when_only_some_inputs_need_them(device_backend, potts):
    """Whichever of the unary and the matrices ask for gradients get the same ones as when all do; with Potts
    matrices and only the unary asking, inference runs on per-class scales, and its gradient is the same too."""
    device, backend = device_backend
    unary, image = _random_inputs(2, 4, 9, 11, torch.float32, device, seed=4)
    crf = CrfRnn(4, 3, theta_alpha=5.0, theta_beta=40.0, theta_gamma=2.0, backend=backend).to(device)
    if not potts:
        with torch.no_grad():
            for k, p in enumerate(crf.parameters()):
                p.add_(0.2 * torch.randn(4, 4, generator=torch.Generator().manual_seed(k)).to(device))
    weights = torch.randn(unary.shape, generator=torch.Generator().manual_seed(9)).to(device)

    def grads(unary_needs: bool, matrices_need: bool):
        u = unary.clone().requires_grad_(unary_needs)
        crf.zero_grad(set_to_none=True)
        for p in crf.parameters():
            p.requires_grad_(matrices_need)
        (crf(u, image) * weights).sum().backward()
        return u.grad, [p.grad for p in crf.parameters()]

    all_u, all_m = grads(True, True)
    only_u, none_m = grads(True, False)
    none_u, only_m = grads(False, True)
    assert none_u is None and all(g is None for g in none_m)
    torch.testing.assert_close(only_u, all_u, atol=1e-6, rtol=1e-5)
    for a, b in zip(only_m, all_m):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for p in crf.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("potts", [False, True], ids=["dense", "potts"])
def test_backward_without_the_compiled_softmax_gradient(monkeypatch, potts):
    """The torch operations that replace the compiled softmax-gradient pass (no numba, or CUDA) give its gradients."""
    import crfasrnn._mean_field as crf_module

    unary, image = _random_inputs(2, 5, 8, 9, seed=5)
    crf = CrfRnn(5, 3, theta_alpha=5.0, theta_beta=40.0, theta_gamma=2.0)
    if not potts:
        with torch.no_grad():
            for k, p in enumerate(crf.parameters()):
                p.add_(0.2 * torch.randn(5, 5, generator=torch.Generator().manual_seed(k)))
    weights = torch.randn(unary.shape, generator=torch.Generator().manual_seed(6))

    def grads():
        u = unary.clone().requires_grad_(True)
        crf.zero_grad(set_to_none=True)
        (crf(u, image) * weights).sum().backward()
        return [u.grad] + [p.grad for p in crf.parameters()]

    compiled = grads()
    monkeypatch.setattr(crf_module, "_crf_numba", None)
    for a, b in zip(grads(), compiled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_gradient_to_image_or_thetas():
    unary, image = _random_inputs(1, 3, 6, 7)
    image.requires_grad_(True)
    crf = CrfRnn(3, 2)
    crf(unary.requires_grad_(True), image).sum().backward()
    assert image.grad is None
    assert all(p.grad is not None for p in crf.parameters())
    assert not any(isinstance(getattr(crf, t), torch.Tensor) for t in ("theta_alpha", "theta_beta", "theta_gamma"))


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (7, 1), (5, 3), (23, 37)], ids=str)
def test_any_size(device_backend, size):
    device, backend = device_backend
    unary, image = _random_inputs(2, 3, *size, device=device)
    out = CrfRnn(3, 2, backend=backend).to(device)(unary, image)
    assert out.shape == unary.shape and torch.isfinite(out).all()


def test_backends_agree():
    unary, image = _random_inputs(2, 5, 21, 18, seed=4)
    outs = [CrfRnn(5, 5, backend=b)(unary, image) for b in ("torch", "numba")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_equals_cuda():
    unary, image = _random_inputs(2, 4, 31, 27, seed=5)
    crf = CrfRnn(4, 5)
    cpu = crf(unary, image)
    cuda = crf.to("cuda")(unary.cuda(), image.cuda()).cpu()
    torch.testing.assert_close(cpu, cuda, rtol=1e-4, atol=1e-4)


def test_crf_smooths_a_noisy_unary():
    """On a two-region image with a noisy unary, mean field recovers the regions (it is not a no-op)."""
    g = torch.Generator().manual_seed(6)
    truth = torch.zeros(24, 32, dtype=torch.long)
    truth[:, 16:] = 1
    image = (truth.float() * 200 + 20)[None, None].expand(1, 3, 24, 32).contiguous()
    unary = 1.5 * F.one_hot(truth, 2).permute(2, 0, 1)[None].float() + 1.5 * torch.randn(1, 2, 24, 32, generator=g)
    before = (unary.argmax(1)[0] == truth).float().mean()
    after = (CrfRnn(2, 5, theta_alpha=20.0, theta_beta=10.0)(unary, image).argmax(1)[0] == truth).float().mean()
    assert before < 0.85 and after > 0.99


# --- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda u, i: (u[0], i), ValueError, r"unary must be a 4-D tensor.*\(3, 4, 5\)"),
        (lambda u, i: (u, i[:1]), ValueError, r"\(2, 3, 4, 5\) and image \(1, 3, 4, 5\) must have the same batch size"),
        (lambda u, i: (u, i[..., :4]), ValueError, r"same batch size and H, W"),
        (lambda u, i: (u, i[:, :1]), ValueError, r"3 channels.*\(2, 1, 4, 5\)"),
        (lambda u, i: (u[:, :2], i), ValueError, r"2 classes but the layer has 3"),
        (lambda u, i: (u.long(), i), TypeError, r"unary must be a floating tensor.*int64"),
        (lambda u, i: (u, i.to(torch.uint8)), TypeError, r"image must be a floating tensor.*uint8"),
        (lambda u, i: (u.index_fill(3, torch.tensor([1]), float("nan")), i), ValueError, r"unary.*NaN or Inf"),
        (lambda u, i: (u, i.index_fill(3, torch.tensor([0]), float("inf"))), ValueError, r"image.*NaN or Inf"),
        (lambda u, i: (u.to("meta"), i), ValueError, r"unary is on meta but image is on cpu"),
        (lambda u, i: (u.numpy(), i), TypeError, r"unary must be a torch.Tensor"),
    ],
    ids=["ndim", "batch", "size", "channels", "classes", "int-unary", "uint8-image", "nan", "inf", "device", "numpy"],
)
def test_bad_input_errors(make, error, pattern):
    unary, image = _random_inputs(2, 3, 4, 5)
    with pytest.raises(error, match=pattern):
        CrfRnn(3, 2)(*make(unary, image))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"num_iterations": -1}, "num_iterations must be an integer >= 0"),
        ({"num_iterations": 2.5}, "num_iterations must be an integer >= 0"),
        ({"theta_alpha": 0.0}, "theta_alpha must be a finite number > 0"),
        ({"theta_beta": -3.0}, "theta_beta must be a finite number > 0"),
        ({"theta_gamma": float("nan")}, "theta_gamma must be a finite number > 0"),
        ({"backend": "cuda"}, "backend must be"),
    ],
)
def test_bad_configuration_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CrfRnn(3, **kwargs)


def test_parameter_device_mismatch():
    unary, image = _random_inputs(1, 3, 4, 5)
    with pytest.raises(ValueError, match="on meta but the layer's parameters are on cpu"):
        CrfRnn(3, 1)(unary.to("meta"), image.to("meta"))


def test_second_derivatives_are_refused_not_wrong():
    """The layer's backward is first-order only: asking for a second derivative raises instead of answering wrongly."""
    crf = CrfRnn(3, 2)
    unary = torch.randn(1, 3, 6, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(crf(unary, torch.rand(1, 3, 6, 7) * 255).pow(2).sum(), unary, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_backward_twice_with_a_retained_graph_gives_the_same_gradients():
    """Backward reads what forward saved without consuming it: a second backward through a retained graph agrees."""
    unary, image = _random_inputs(2, 4, 9, 11, seed=7)
    crf = CrfRnn(4, 3, theta_alpha=5.0, theta_beta=40.0, theta_gamma=2.0)
    unary.requires_grad_(True)
    out = crf(unary, image)
    out.sum().backward(retain_graph=True)
    first = [unary.grad.clone()] + [p.grad.clone() for p in crf.parameters()]
    unary.grad = None
    crf.zero_grad(set_to_none=True)
    out.sum().backward()
    for a, b in zip(first, [unary.grad] + [p.grad for p in crf.parameters()]):
        assert torch.equal(a, b)
