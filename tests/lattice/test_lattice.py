"""The permutohedral lattice: reference case, exact Gaussian on tiny inputs, transpose, batching, back ends, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import pixel_grid

from crfasrnn import PermutohedralLattice, permutohedral_filter
from crfasrnn.lattice import filter_each, filter_sum, numba_available, values_buffer


def _features_nchw(points_hwd: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(points_hwd).permute(2, 0, 1)[None].contiguous().to(device)


def _random_features(batch: int, d: int, height: int, width: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Positions over a bandwidth plus random 'colours': a realistic, sparse lattice."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = pixel_grid(height, width, dtype)
    pos = torch.stack([xs, ys])[: min(d, 2)] / 2.5
    rest = torch.rand(batch, max(d - 2, 0), height, width, generator=g, dtype=dtype) * 6
    return torch.cat([pos[None].expand(batch, -1, -1, -1), rest], dim=1).to(device)


# --- the reference case ---------------------------------------------------------------------------------------------

CASE_D_KEYS = ["out_raw", "out_reverse_raw", "out_raw_2ch", "ones_raw"]


@pytest.mark.parametrize("tag", ["bilateral", "spatial"])
@pytest.mark.parametrize("key", CASE_D_KEYS)
def test_reference_case_d(case_d, device_backend, tag, key):
    """Reproduces the PyTorch port's raw lattice filter (produced by running it; see tests/reference/README.md)."""
    device, backend = device_backend
    lattice = PermutohedralLattice(_features_nchw(case_d[f"features_{tag}"], device), backend=backend)
    values = torch.from_numpy(case_d["values"])[None].to(device)
    if key == "out_raw_2ch":
        values = values[:, :2].contiguous()
    if key == "ones_raw":
        values = torch.ones(1, 1, 50, 60, device=device)
    out = lattice.filter(values, reverse=(key == "out_reverse_raw"))[0].cpu().numpy()
    expected = case_d[f"{tag}_{key}"].reshape(out.shape)
    err = np.abs(out - expected)
    assert err.max() < 1e-3 and err.mean() < 1e-5, (err.max(), err.mean())
    # in fact the lattice is rebuilt bit-exactly: only the float32 summation order may differ by a few ULP
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tag", ["bilateral", "spatial"])
def test_reference_normalised(case_d, tag):
    lattice = PermutohedralLattice(_features_nchw(case_d[f"features_{tag}"], "cpu"))
    values = torch.from_numpy(case_d["values"])[None]
    norm = 1.0 / (lattice.filter(torch.ones(1, 1, 50, 60)) + float(case_d["eps"]))
    out = (lattice.filter(values) * norm)[0].numpy()
    np.testing.assert_allclose(out, case_d[f"{tag}_out_normalized"], rtol=1e-5, atol=1e-5)


# --- against the exact Gaussian ---------------------------------------------------------------------------------------


def _exact_normalised(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Brute force: sum_j exp(-|f_i - f_j|^2 / 2) v_j / sum_j exp(-|f_i - f_j|^2 / 2), in float64."""
    b, c, h, w = values.shape
    f = features.reshape(b, features.shape[1], h * w).transpose(1, 2).double()
    k = torch.exp(-0.5 * torch.cdist(f, f) ** 2)
    out = torch.einsum("bij,bcj->bci", k, values.reshape(b, c, h * w).double()) / k.sum(dim=2)[:, None]
    return out.reshape(b, c, h, w)


# (d, height, width, bound on the mean error, bound on the max error). Measured lattice errors (mean, max) with these
# seeds: d=1 (0.005, 0.019), d=2 theta=1 (0.007, 0.046), d=2 theta=3 (0.003, 0.013), d=3 (0.008, 0.030),
# d=5 (0.014, 0.15); a filter that does nothing (identity) is off by about 0.21 on average.
BRUTE_FORCE_CASES = [
    ("d1", 1, 1, 30, 0.01, 0.04),
    ("d2-theta1", 2, 9, 11, 0.015, 0.08),
    ("d2-theta3", 2, 20, 25, 0.006, 0.03),
    ("d3", 3, 8, 9, 0.015, 0.06),
    ("d5", 5, 12, 14, 0.025, 0.25),
]


@pytest.mark.parametrize(
    "name,d,height,width,mean_bound,max_bound", BRUTE_FORCE_CASES, ids=[c[0] for c in BRUTE_FORCE_CASES]
)
def test_normalised_filter_approximates_exact_gaussian(device_backend, name, d, height, width, mean_bound, max_bound):
    device, backend = device_backend
    g = torch.Generator().manual_seed(1)
    xs, ys = pixel_grid(height, width, torch.float64)
    if d == 1:
        feats = (xs / 2.0)[None, None]
    elif d == 2:
        theta = 1.0 if name == "d2-theta1" else 3.0
        feats = torch.stack([xs, ys])[None] / theta
    elif d == 3:
        feats = torch.cat(
            [torch.stack([xs, ys]) / 2.0, torch.rand(1, height, width, generator=g, dtype=torch.float64) * 3]
        )[None]
    else:
        colours = torch.rand(3, height, width, generator=g, dtype=torch.float64) * 255
        feats = torch.cat([torch.stack([xs, ys]) / 5.0, colours / 60.0])[None]
    values = torch.rand(1, 3, height, width, generator=g, dtype=torch.float64)
    feats, values = feats.to(device), values.to(device)
    lattice = PermutohedralLattice(feats, backend=backend)
    approx = lattice.filter(values) / lattice.filter(torch.ones_like(values[:, :1]))
    exact = _exact_normalised(values, feats)
    err = (approx - exact).abs()
    identity_err = (values - exact).abs().mean()
    assert err.mean() < mean_bound, err.mean()
    assert err.max() < max_bound, err.max()
    assert err.mean() < 0.12 * identity_err  # the lattice really filters


def test_bandwidth_is_one_feature_unit():
    """A delta spreads with a standard deviation of about theta pixels (SPEC §2.2)."""
    theta = 3.0
    xs, ys = pixel_grid(41, 41)
    lattice = PermutohedralLattice(torch.stack([xs, ys])[None] / theta)
    delta = torch.zeros(1, 1, 41, 41)
    delta[0, 0, 20, 20] = 1.0
    response = lattice.filter(delta)[0, 0].double()
    weights = response / response.sum()
    std_x = torch.sqrt((weights * (xs.double() - 20) ** 2).sum())
    assert 0.95 * theta < std_x < 1.1 * theta


# --- linear-algebra properties ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 5])
def test_reverse_is_the_transpose(device_backend, dtype, d):
    device, backend = device_backend
    feats = _random_features(1, d, 13, 17, dtype, device)
    lattice = PermutohedralLattice(feats, backend=backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 13, 17, generator=g, dtype=dtype).to(device)
    y = torch.randn(1, 2, 13, 17, generator=g, dtype=dtype).to(device)
    lhs = (lattice.filter(x) * y).sum()
    rhs = (x * lattice.filter(y, reverse=True)).sum()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(lhs - rhs) <= tol * abs(lhs).clamp(min=1.0)
    # and the filter itself is not symmetric: the axis blurs do not commute
    assert (lattice.filter(x) - lattice.filter(x, reverse=True)).abs().max() > 1e-3


def test_filter_is_linear(device_backend):
    device, backend = device_backend
    lattice = PermutohedralLattice(_random_features(1, 5, 9, 10, torch.float64, device), backend=backend)
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(1, 3, 9, 10, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    torch.testing.assert_close(lattice.filter(2.0 * x - 3.0 * y), 2.0 * lattice.filter(x) - 3.0 * lattice.filter(y))


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(device_backend, reverse):
    device, backend = device_backend
    feats = _random_features(2, 3, 4, 5, torch.float64, device)
    values = torch.randn(2, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: permutohedral_filter(v, feats, reverse=reverse, backend=backend), (values,)
    )
    assert torch.autograd.gradgradcheck(
        lambda v: permutohedral_filter(v, feats, reverse=reverse, backend=backend), (values,)
    )


# --- shapes, batches and back ends ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 1, 7), (2, 3, 5, 1), (3, 4, 7, 11)], ids=str)
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_any_shape(device_backend, dtype, shape, d):
    device, backend = device_backend
    b, c, h, w = shape
    feats = _random_features(b, d, h, w, dtype, device)
    values = torch.rand(b, c, h, w, dtype=dtype, device=device)
    out = permutohedral_filter(values, feats, backend=backend)
    assert out.shape == values.shape and out.dtype == dtype and out.device.type == device.type
    assert torch.isfinite(out).all()
    # positive values stay positive, and a lone point only sees itself: weight sum_r b_r^2 * alpha <= 1
    assert (out > 0).all()
    if h * w == 1:
        assert (out <= values + 1e-6).all()


def test_batch_equals_loop(device_backend, dtype):
    device, backend = device_backend
    feats = _random_features(3, 5, 11, 9, dtype, device, seed=7)
    values = torch.randn(3, 4, 11, 9, dtype=dtype, device=device)
    batched = PermutohedralLattice(feats, backend=backend).filter(values)
    for i in range(3):
        alone = PermutohedralLattice(feats[i : i + 1], backend=backend).filter(values[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-6, atol=1e-6)


def test_shared_lattice_filters_every_image(device_backend):
    device, backend = device_backend
    xs, ys = pixel_grid(8, 13, device=device)
    lattice = PermutohedralLattice(torch.stack([xs, ys])[None] / 3.0, backend=backend)
    values = torch.randn(4, 3, 8, 13, device=device)
    shared = lattice.filter(values)
    for i in range(4):
        torch.testing.assert_close(shared[i : i + 1], lattice.filter(values[i : i + 1]))


def test_filter_points_matches_filter(device_backend):
    device, backend = device_backend
    lattice = PermutohedralLattice(_random_features(2, 5, 6, 7, torch.float32, device), backend=backend)
    values = torch.randn(2, 3, 6, 7, device=device)
    points = values.permute(0, 2, 3, 1).reshape(2, 42, 3)
    out = lattice.filter_points(points).reshape(2, 6, 7, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, lattice.filter(values))


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("integer_grid", [False, True], ids=["random", "ties"])
def test_numba_and_torch_paths_agree(dtype, d, integer_grid):
    """The CPU (numba) and CUDA (torch) constructions give the same lattice, ties in the rank included."""
    feats = _random_features(2, d, 15, 12, dtype, "cpu", seed=d)
    if integer_grid:  # exact ties between coordinates, and rounding at exactly .5
        feats = torch.round(feats * 2) / 2
    values = torch.randn(2, 3, 15, 12, dtype=dtype)
    a = PermutohedralLattice(feats, backend="numba")
    b = PermutohedralLattice(feats, backend="torch")
    assert a.num_vertices == b.num_vertices
    for reverse in (False, True):
        torch.testing.assert_close(a.filter(values, reverse=reverse), b.filter(values, reverse=reverse))


def test_lattice_is_reused_without_rebuilding():
    feats = _random_features(1, 5, 10, 10, torch.float32, "cpu")
    lattice = PermutohedralLattice(feats)
    first = lattice.filter(torch.ones(1, 1, 10, 10))
    for _ in range(3):
        torch.testing.assert_close(lattice.filter(torch.ones(1, 1, 10, 10)), first, rtol=0, atol=0)


# --- errors -----------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    feats = torch.rand(1, 2, 4, 5)
    with pytest.raises(ValueError, match=r"\(B, d, \*spatial\).*\(4, 5\)"):
        PermutohedralLattice(feats[0, 0])
    with pytest.raises(ValueError, match=r"\(B, d, \*spatial\).*\(1, 1, 1, 1, 2, 4, 5\)"):
        PermutohedralLattice(feats[None, None, None])
    with pytest.raises(TypeError, match="floating"):
        PermutohedralLattice(torch.ones(1, 2, 4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        PermutohedralLattice(torch.full((1, 2, 4, 5), float("nan")))
    with pytest.raises(ValueError, match="backend"):
        PermutohedralLattice(feats, backend="fortran")
    with pytest.raises(ValueError, match="too small"):
        PermutohedralLattice(torch.rand(1, 5, 4, 5) * 1e7)
    lattice = PermutohedralLattice(feats)
    with pytest.raises(ValueError, match=r"\(B, C, 4, 5\).*\(1, 3, 5, 4\)"):
        lattice.filter(torch.rand(1, 3, 5, 4))
    with pytest.raises(TypeError, match=r"float64.*float32"):
        lattice.filter(torch.rand(1, 3, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch 2 .*expected \(2, 20, C\)"):
        PermutohedralLattice(torch.rand(2, 2, 4, 5)).filter(torch.rand(3, 1, 4, 5))
    with pytest.raises(ValueError, match="batch size"):
        permutohedral_filter(torch.rand(2, 1, 4, 5), feats)
    with pytest.raises(TypeError, match="dtype"):
        permutohedral_filter(torch.rand(1, 1, 4, 5, dtype=torch.float64), feats)


# --- normalisation and in-place output --------------------------------------------------------------------------------


def test_normalize_divides_by_the_filtered_ones(device_backend, dtype):
    device, backend = device_backend
    lattice = PermutohedralLattice(_random_features(2, 5, 9, 8, dtype, device), backend=backend)
    values = torch.rand(2, 3, 9, 8, dtype=dtype, device=device)
    ones = lattice.filter(torch.ones(2, 1, 9, 8, dtype=dtype, device=device))
    torch.testing.assert_close(lattice.filter(values, normalize=True), lattice.filter(values) / ones)
    # a constant image stays (almost) constant after normalised filtering
    const = lattice.filter(torch.full((2, 1, 9, 8), 7.0, dtype=dtype, device=device), normalize=True)
    torch.testing.assert_close(const, torch.full_like(const, 7.0))


def test_normalized_filter_gradient_is_its_transpose(device_backend):
    device, backend = device_backend
    feats = _random_features(1, 3, 4, 6, torch.float64, device)
    lattice = PermutohedralLattice(feats, backend=backend)
    values = torch.randn(1, 2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lattice.filter(v, normalize=True), (values,))


def test_out_argument_writes_in_place(device_backend):
    device, backend = device_backend
    lattice = PermutohedralLattice(_random_features(2, 5, 6, 7, torch.float32, device), backend=backend)
    points = torch.randn(2, 42, 3, device=device)
    out = torch.empty_like(points)
    with torch.no_grad():
        returned = lattice.filter_points(points, normalize=True, out=out)
    assert returned is out
    torch.testing.assert_close(out, lattice.filter_points(points, normalize=True))
    with pytest.raises(RuntimeError, match="does not support autograd"):
        lattice.filter_points(points.requires_grad_(True), out=out)
    with pytest.raises(ValueError, match="out must match"):
        lattice.filter_points(points.detach(), out=out[:, :, :2])


def test_all_finite():
    from crfasrnn.lattice import all_finite

    x = torch.randn(3, 4)
    assert all_finite(x) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2] = bad
        assert not all_finite(y)


# --- weighted sums of filterings (the CRF's message passing without autograd) ----------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["own-lattices", "shared-lattice"])
@pytest.mark.parametrize("normalize", [True, False])
def test_filter_sum_equals_separate_filterings(device_backend, dtype, shared, normalize):
    """``base + Σ scale_k ⊙ K_k v`` in one call equals the separate filterings, also with a batch-shared lattice."""
    device, backend = device_backend
    batch, height, width, channels = 3, 7, 9, 4
    first = PermutohedralLattice(
        _random_features(1 if shared else batch, 2, height, width, dtype, device, seed=1), backend=backend
    )
    second = PermutohedralLattice(_random_features(batch, 4, height, width, dtype, device, seed=2), backend=backend)
    g = torch.Generator().manual_seed(3)
    values = torch.rand(batch, height * width, channels, generator=g, dtype=dtype).to(device)
    base = torch.randn(batch, height * width, channels, generator=g, dtype=dtype).to(device)
    scales = [torch.randn(channels, generator=g, dtype=dtype).to(device) for _ in range(2)]
    expected = base.clone()
    for lattice, scale in zip((first, second), scales):
        expected += scale * lattice.filter_points(values, normalize=normalize)
    total = filter_sum(values, [first, second], scales, base=base, normalize=normalize)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(total, expected, atol=tol, rtol=tol)
    # writing over the base term in place gives the same
    in_place = base.clone()
    assert filter_sum(values, [first, second], scales, base=in_place, normalize=normalize, out=in_place) is in_place
    torch.testing.assert_close(in_place, expected, atol=tol, rtol=tol)


def test_filter_sum_one_lattice_and_no_base(device_backend):
    device, backend = device_backend
    lattice = PermutohedralLattice(_random_features(2, 3, 5, 6, torch.float64, device), backend=backend)
    values = torch.rand(2, 30, 3, dtype=torch.float64, device=device)
    scale = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=device)
    torch.testing.assert_close(
        filter_sum(values, [lattice], [scale]), scale * lattice.filter_points(values, normalize=True)
    )


def test_filter_sum_errors():
    lattice = PermutohedralLattice(_random_features(1, 2, 4, 5, torch.float32, "cpu"))
    values = torch.rand(1, 20, 3)
    with pytest.raises(ValueError, match="one scale per lattice"):
        filter_sum(values, [lattice, lattice], [torch.ones(3)])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        filter_sum(values, [lattice], [torch.ones(4)])
    with pytest.raises(ValueError, match="base"):
        filter_sum(values, [lattice], [torch.ones(3)], base=torch.zeros(1, 20, 2))
    with pytest.raises(ValueError, match="do not fit"):
        filter_sum(torch.rand(1, 21, 3), [lattice], [torch.ones(3)])


@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "over-values"])
def test_filter_sum_softmax_out(device_backend, dtype, in_place):
    """The fused softmax of the result (a mean-field step's next probabilities) equals torch.softmax, also when it
    overwrites the filtered values, and with logits spread wide enough to exercise exp's range reduction."""
    device, backend = device_backend
    first = PermutohedralLattice(_random_features(2, 2, 6, 7, dtype, device, seed=4), backend=backend)
    second = PermutohedralLattice(_random_features(2, 5, 6, 7, dtype, device, seed=5), backend=backend)
    g = torch.Generator().manual_seed(6)
    values = torch.rand(2, 42, 5, generator=g, dtype=dtype).to(device)
    base = (torch.randn(2, 42, 5, generator=g, dtype=dtype) * 30).to(device)
    scales = [torch.full((5,), -3.0, dtype=dtype, device=device), torch.full((5,), -5.0, dtype=dtype, device=device)]
    expected_total = filter_sum(values, [first, second], scales, base=base)
    target = values.clone() if in_place else torch.empty_like(values)
    total = filter_sum(target if in_place else values, [first, second], scales, base=base, softmax_out=target)
    torch.testing.assert_close(total, expected_total)
    tol = 2e-7 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(target, torch.softmax(expected_total, dim=-1), atol=tol, rtol=1e-5)
    # only the softmax wanted: the sum is not stored, and the result is the same
    only = values.clone() if in_place else torch.empty_like(values)
    returned = filter_sum(
        only if in_place else values, [first, second], scales, base=base, softmax_out=only, keep_sum=False
    )
    assert returned is only
    torch.testing.assert_close(only, target, atol=tol, rtol=1e-5)
    with pytest.raises(ValueError, match="softmax_out"):
        filter_sum(values, [first, second], scales, softmax_out=torch.empty(2, 42, 4, dtype=dtype, device=device))
    with pytest.raises(ValueError, match="keep_sum"):
        filter_sum(values, [first, second], scales, keep_sum=False)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_concurrent_filtering_from_threads_matches_serial():
    """Scratch grids are handed out per call: lattices filtered from several threads at once give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    lattices = [
        PermutohedralLattice(_random_features(1, 3, 70, 80, torch.float32, "cpu", seed=s), backend="numba")
        for s in range(3)
    ]
    values = [torch.rand(1, 70 * 80, 5, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    expected = [lat.filter_points(v, normalize=True) for lat, v in zip(lattices, values)]
    pair = filter_sum(values[0], [lattices[0], lattices[0]], [torch.ones(5), -torch.ones(5)])
    torch.testing.assert_close(pair, torch.zeros_like(pair), atol=1e-6, rtol=0)  # the same lattice twice

    def job(k):
        return lattices[k % 3].filter_points(values[k % 3], normalize=True)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(12)))
    for k, result in enumerate(results):
        assert torch.equal(result, expected[k % 3])


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_empty_cache_releases_the_idle_grids():
    from crfasrnn.lattice import empty_cache

    lattice = PermutohedralLattice(_random_features(1, 3, 40, 50, torch.float32, "cpu"), backend="numba")
    values = torch.rand(1, 2000, 4)
    expected = lattice.filter_points(values)
    assert empty_cache() > 0  # the filtering's grids went back to the pool
    assert empty_cache() == 0
    assert torch.equal(lattice.filter_points(values), expected)  # and filtering works after a release


# --- channel padding, filtering through several lattices, transposes, mixing matrices ---------------------------------


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("channels", [1, 3, 4, 5, 8, 9, 21])
def test_numba_padding_of_any_channel_count_matches_torch(channels):
    """The numba kernels work on rows padded to a multiple of 8 channels; every count gives the torch results."""
    g = torch.Generator().manual_seed(channels)
    lattices = {}
    for backend in ("numba", "torch"):
        lattices[backend] = (
            PermutohedralLattice(_random_features(2, 2, 9, 11, torch.float32, "cpu", seed=1), backend=backend),
            PermutohedralLattice(_random_features(2, 5, 9, 11, torch.float32, "cpu", seed=2), backend=backend),
        )
    values = torch.rand(2, 99, channels, generator=g)
    base = torch.randn(2, 99, channels, generator=g)
    scales = [torch.randn(channels, generator=g) for _ in range(2)]
    results = {}
    for backend, pair in lattices.items():
        soft = torch.empty_like(values)
        results[backend] = (
            pair[1].filter_points(values, reverse=False),
            pair[1].filter_points(values, reverse=True, normalize=True),
            filter_sum(values, pair, scales, base=base, softmax_out=soft),
            soft,
        )
    for ours, theirs in zip(results["numba"], results["torch"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_values_buffer_layout_and_use_in_place(device_backend):
    """values_buffer gives zeros whose rows the numba filters read without a copy; filter_sum may write its softmax
    into such a buffer (over the values it filters) and leaves the padding alone."""
    device, backend = device_backend
    like = torch.empty(0, device=device)
    buffer = values_buffer(2, 42, 5, like=like)
    assert buffer.shape == (2, 42, 5) and buffer.device == like.device and not buffer.any()
    padded = numba_available() and buffer.device.type == "cpu"  # the layout is the CPU's, whichever back end filters
    assert buffer.stride() == ((42 * 8, 8, 1) if padded else (42 * 5, 5, 1))
    first = PermutohedralLattice(_random_features(2, 2, 6, 7, torch.float32, device, seed=7), backend=backend)
    second = PermutohedralLattice(_random_features(2, 5, 6, 7, torch.float32, device, seed=8), backend=backend)
    g = torch.Generator().manual_seed(9)
    values = torch.rand(2, 42, 5, generator=g).to(device)
    base = torch.randn(2, 42, 5, generator=g).to(device)
    scales = [torch.full((5,), -3.0, device=device), torch.full((5,), -5.0, device=device)]
    expected = torch.softmax(filter_sum(values, [first, second], scales, base=base), dim=-1)
    buffer.copy_(values)
    filter_sum(buffer, [first, second], scales, base=base, softmax_out=buffer, keep_sum=False)
    torch.testing.assert_close(buffer, expected, atol=2e-7, rtol=1e-5)
    if padded:
        whole = buffer.as_strided((2, 42, 8), (42 * 8, 8, 1))
        assert not whole[..., 5:].any()  # the padding is still zero


@pytest.mark.parametrize("transpose", [False, True], ids=["filter", "transpose"])
@pytest.mark.parametrize("shared", [False, True], ids=["own-lattices", "shared-lattice"])
def test_filter_each_equals_separate_filterings(device_backend, dtype, transpose, shared):
    device, backend = device_backend
    batch, channels = 2, 5
    first = PermutohedralLattice(
        _random_features(1 if shared else batch, 2, 6, 7, dtype, device, seed=10), backend=backend
    )
    second = PermutohedralLattice(_random_features(batch, 5, 6, 7, dtype, device, seed=11), backend=backend)
    values = torch.rand(batch, 42, channels, generator=torch.Generator().manual_seed(12), dtype=dtype).to(device)
    method = "transpose_points" if transpose else "filter_points"
    expected = [getattr(lattice, method)(values, normalize=True) for lattice in (first, second)]
    for got, want in zip(filter_each(values, [first, second], normalize=True, transpose=transpose), expected):
        torch.testing.assert_close(got, want)
    # into the two halves of one (B, N, 2C) tensor
    both = torch.full((batch, 42, 2 * channels), float("nan"), dtype=dtype, device=device)
    halves = [both[..., :channels], both[..., channels:]]
    assert filter_each(values, [first, second], normalize=True, transpose=transpose, out=halves)[1] is halves[1]
    for got, want in zip(halves, expected):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="one out per lattice"):
        filter_each(values, [first, second], out=[halves[0]])


@pytest.mark.parametrize("normalize", [False, True])
def test_transpose_points_is_the_adjoint(device_backend, normalize):
    """<K_n v, g> = <v, K_nᵀ g> to float64 rounding, and it is what autograd's backward of filter_points gives."""
    device, backend = device_backend
    lattice = PermutohedralLattice(_random_features(2, 3, 5, 6, torch.float64, device, seed=13), backend=backend)
    g = torch.Generator().manual_seed(14)
    v = torch.rand(2, 30, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.rand(2, 30, 3, generator=g, dtype=torch.float64).to(device)
    lhs = (lattice.filter_points(v, normalize=normalize) * w).sum()
    transposed = lattice.transpose_points(w, normalize=normalize)
    torch.testing.assert_close(lhs.detach(), (v.detach() * transposed).sum(), atol=1e-12, rtol=1e-12)
    lhs.backward()
    torch.testing.assert_close(v.grad, transposed)
    out = torch.empty_like(w)
    assert lattice.transpose_points(w, normalize=normalize, out=out) is out
    torch.testing.assert_close(out, transposed)


def test_filter_sum_with_mixing_matrices(device_backend, dtype):
    """(C, C) scales mix the channels: base + Σ_k (n_k ⊙ K_k v) @ M_k, beside per-channel factors."""
    device, backend = device_backend
    first = PermutohedralLattice(_random_features(1, 2, 6, 7, dtype, device, seed=15), backend=backend)
    second = PermutohedralLattice(_random_features(2, 5, 6, 7, dtype, device, seed=16), backend=backend)
    g = torch.Generator().manual_seed(17)
    values = torch.rand(2, 42, 4, generator=g, dtype=dtype).to(device)
    base = torch.randn(2, 42, 4, generator=g, dtype=dtype).to(device)
    mixing = torch.randn(4, 4, generator=g, dtype=dtype).to(device)
    factors = torch.randn(4, generator=g, dtype=dtype).to(device)
    expected = (
        base
        + first.filter_points(values, normalize=True) @ mixing
        + second.filter_points(values, normalize=True) * factors
    )
    soft = torch.empty_like(values)
    total = filter_sum(values, [first, second], [mixing, factors], base=base, softmax_out=soft)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(soft, torch.softmax(expected, dim=-1))
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(4, 4\)"):
        filter_sum(values, [first], [torch.ones(4, 3, dtype=dtype, device=device)])


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_splat_work_is_split_evenly():
    """The splat's work items partition the vertices and carry about equal numbers of entries each."""
    lattice = PermutohedralLattice(_random_features(1, 5, 60, 80, torch.float32, "cpu", seed=18), backend="numba")
    structure = lattice._structure
    chunks, start = structure.splat_chunks, structure.splat_start
    assert chunks[0] == 0 and chunks[-1] == structure.num_vertices and np.all(np.diff(chunks) > 0)
    entries = np.diff(start[chunks])
    assert entries.sum() == start[-1]
    busiest_vertex = np.diff(start).max()
    assert entries.max() <= start[-1] / (len(chunks) - 1) + busiest_vertex  # no item above its share plus one vertex


# --- the reference's padding (phantom vertices) ---------------------------------------------------------------------


@pytest.mark.parametrize("num_points", [9, 10, 11, 12])
def test_pad_to_adds_the_vertices_of_the_zero_vectors_and_nothing_else(device_backend, num_points):
    """``pad_to=4`` is the lattice over the points and the zero vectors that pad them to a multiple of 4, where the
    zero vectors carry no value and are not sliced (what pydensecrf's and Caffe's SSE elevation does)."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(num_points)
    features = (torch.rand(2, 3, num_points, generator=gen) * 2 + 0.3).to(device)
    phantoms = (-num_points) % 4
    padded = torch.cat([features, features.new_zeros(2, 3, phantoms)], dim=2)
    values = torch.rand(2, num_points, 2, generator=gen).to(device)
    padded_values = torch.cat([values, values.new_zeros(2, phantoms, 2)], dim=1)
    ours = PermutohedralLattice(features, backend=backend, pad_to=4)
    explicit = PermutohedralLattice(padded, backend=backend)
    for reverse in (False, True):
        want = explicit.filter_points(padded_values, reverse=reverse)[:, :num_points]
        torch.testing.assert_close(ours.filter_points(values, reverse=reverse), want, rtol=1e-6, atol=1e-6)
    ones = torch.cat([values.new_ones(2, num_points, 1), values.new_zeros(2, phantoms, 1)], dim=1)
    torch.testing.assert_close(
        ours.normalizer,
        1 / (explicit.filter_points(ones)[:, :num_points] + 2.220446049250313e-16),
        rtol=1e-6,
        atol=1e-6,
    )
    if phantoms == 0:
        assert ours.num_vertices == PermutohedralLattice(features, backend=backend).num_vertices
    with pytest.raises(ValueError, match="pad_to"):
        PermutohedralLattice(features, backend=backend, pad_to=0)


@pytest.mark.parametrize("transpose", [False, True])
def test_compact_lattices_filter_like_the_default_ones(transpose):
    """A compact lattice (no splat lists: the splat scatters ranges of points) gives the default lattice's filterings
    to float rounding, alone, through filter_each and in the fused filter_sum, with and without normalisations."""
    gen = torch.Generator().manual_seed(4)
    features = torch.rand(2, 4, 40000, generator=gen) * torch.tensor([6.0, 6.0, 3.0, 2.0]).view(1, 4, 1)
    default, compact = PermutohedralLattice(features), PermutohedralLattice(features, compact=True)
    assert compact.tensors[5].numel() == 0 < default.tensors[5].numel()  # no splat lists
    values = torch.rand(2, 40000, 3, generator=gen)
    for normalize in (False, True):
        want = (
            default.transpose_points(values, normalize)
            if transpose
            else default.filter_points(values, normalize=normalize)
        )
        got = (
            compact.transpose_points(values, normalize)
            if transpose
            else compact.filter_points(values, normalize=normalize)
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = PermutohedralLattice(features[:, :2] * 2, compact=True)
    scales = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.3, 2.0])]
    for modes in ([3, 3], [0, 2]):
        want = filter_sum(values, [default, PermutohedralLattice(features[:, :2] * 2)], scales, modes=modes)
        torch.testing.assert_close(
            filter_sum(values, [compact, other], scales, modes=modes), want, rtol=1e-5, atol=1e-5
        )


@pytest.mark.skipif(not numba_available(), reason="numba back end")
def test_the_parallel_hash_table_gives_the_sequential_lattice(monkeypatch):
    """From 2^17 points the vertices are inserted by ranges of points in parallel and merged: the lattice is the
    sequential one, vertex for vertex (ids in first-insertion order), for points that repeat simplices and ones that
    do not."""
    from crfasrnn.lattice import _numba

    gen = torch.Generator().manual_seed(9)
    smooth = (
        torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (40, 60, 70)], indexing="ij"))
        .reshape(3, -1)
        .t()[None]
        / 3.0
    )
    rough = torch.rand(1, 150000, 4, generator=gen) * 20
    for points in (smooth.contiguous(), rough):
        assert points.shape[1] >= _numba._PARALLEL_INSERT_POINTS
        parallel = _numba.build_lattice(points)
        with monkeypatch.context() as patch:
            patch.setattr(_numba, "_PARALLEL_INSERT_POINTS", 1 << 40)  # one range: the sequential insertion
            sequential = _numba.build_lattice(points)
        for name in ("offsets", "weights", "blur_neighbours", "splat_start", "splat_points", "splat_weights"):
            np.testing.assert_array_equal(getattr(parallel, name), getattr(sequential, name), err_msg=name)


@pytest.mark.skipif(not numba_available(), reason="numba back end")
@pytest.mark.parametrize("num_points, d", [(200000, 3), (5000, 5)])
def test_the_compact_lattices_normaliser_is_the_filtered_ones_inverted(num_points, d):
    """A compact lattice computes its normaliser in one fused pass; it is bit for bit 1 / (K·1 + ε) filtered through
    the same lattice."""
    from crfasrnn.lattice import _ops

    points = torch.rand(1, num_points, d, generator=torch.Generator().manual_seed(d)) * 8
    tensors = _ops.build(points, "numba", 1, True)
    ones = points.new_ones(num_points, 1)
    want = (1.0 / (_ops.filter_flat(tensors, ones, False, None, None) + _ops.NORMALISER_EPS)).reshape(-1)
    assert torch.equal(tensors[3], want)
