"""The CRF as a PyTorch operator: opcheck, torch.compile, torch.export, autocast and half inputs, memory formats,
determinism, FakeTensor and meta tensors, forked workers and thread counts."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.library import opcheck

from crfasrnn import CrfRnn, CrfRnnNet, crf_rnn, refine
from crfasrnn.lattice import _ops as lattice_ops
from crfasrnn.lattice import numba_available

REPO = Path(__file__).resolve().parents[1]

BACKENDS = (["numba"] if numba_available() else []) + ["torch"]


def _devices_backends():
    pairs = [("cpu", b) for b in BACKENDS]
    if torch.cuda.is_available():
        pairs.append(("cuda", "torch"))
    return pairs


def _scene(batch=2, classes=4, height=18, width=23, *, seed=0, dtype=torch.float32, device="cpu"):
    """A two-region image with noisy unaries: enough structure that the CRF changes labels, deterministic."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(batch, 3, height, width)
    image[:, :, :, width // 2 :] = 200.0
    image += 10 * torch.rand(batch, 3, height, width, generator=g)
    unary = 2 * torch.randn(batch, classes, height, width, generator=g)
    return unary.to(device, dtype), image.to(device, dtype)


# --- opcheck on every registered operator -----------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", _devices_backends(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck_every_operator(device, backend, dtype):
    g = torch.Generator().manual_seed(1)
    points = (torch.rand(2, 30, 3, generator=g, dtype=dtype) * 4).to(device)
    spatial_points = (torch.rand(1, 30, 2, generator=g, dtype=dtype) * 3).to(device)
    opcheck(torch.ops.crfasrnn.lattice_build.default, (points, backend))
    opcheck(torch.ops.crfasrnn.lattice_build.default, (points[:, :29], backend, 4))  # the reference's padding
    opcheck(torch.ops.crfasrnn.lattice_build.default, (points, backend, 1, True))  # compact: no splat lists
    compact = lattice_ops.build(points, backend, 1, True)
    opcheck(
        torch.ops.crfasrnn.mean_field.default,
        (
            torch.randn(2, 30, 4, generator=g, dtype=dtype).to(device),
            compact,
            [-2.0 * torch.eye(4, dtype=dtype, device=device)],
            [3],
            2,
            False,
        ),
    )
    bilateral = lattice_ops.build(points, backend)
    spatial = lattice_ops.build(spatial_points, backend)
    values = torch.rand(2, 30, 4, generator=g, dtype=dtype).to(device).requires_grad_(True)
    for reverse, pre, post in [(False, 0, 1), (True, 1, 0), (False, 0, 0), (True, 2, 2)]:
        opcheck(torch.ops.crfasrnn.lattice_filter.default, (values, bilateral, reverse, pre, post))
        opcheck(torch.ops.crfasrnn.lattice_filter.default, (values, spatial, reverse, pre, post))  # shared lattice
    unary = torch.randn(2, 30, 4, generator=g, dtype=dtype).to(device).requires_grad_(True)
    dense = [torch.randn(4, 4, generator=g, dtype=dtype).to(device).requires_grad_(True) for _ in range(2)]
    potts = [(s * torch.eye(4, dtype=dtype, device=device)).requires_grad_(True) for s in (-3.0, -5.0)]
    single = [torch.randn(4, 4, generator=g, dtype=dtype).to(device).requires_grad_(True)]
    three = dense + [(-2.0 * torch.eye(4, dtype=dtype, device=device)).requires_grad_(True)]
    for mixing, lattices, modes in (
        (dense, spatial + bilateral, [2, 2]),
        (potts, spatial + bilateral, [3, 1]),
        (single, bilateral, [0]),
        (three, spatial + bilateral + bilateral, [1, 2, 3]),
    ):
        opcheck(torch.ops.crfasrnn.mean_field.default, (unary, lattices, mixing, modes, 3, True))
        opcheck(
            torch.ops.crfasrnn.mean_field.default,
            (unary.detach(), lattices, [a.detach() for a in mixing], modes, 2, False),
        )
        _, probs = torch.ops.crfasrnn.mean_field(unary, lattices, mixing, modes, 3, True)
        grad = torch.randn(2, 30, 4, generator=g, dtype=dtype).to(device)
        k = len(mixing)
        for needs in [(True, [True] * k), (True, [False] * k), (False, [True] + [False] * (k - 1))]:
            opcheck(
                torch.ops.crfasrnn.mean_field_backward.default,
                (grad, probs.detach(), lattices, [a.detach() for a in mixing], modes, *needs),
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modes", [[2], [1, 3], [0, 1, 3], [3, 3, 2]], ids=str)
def test_mean_field_with_any_kernels_and_normalisations_matches_a_written_out_loop(backend, modes):
    """The operator with one or three kernels, in every normalisation (none, before, after, symmetric), equals the
    iterations written out with the differentiable filter operator, in value and in the gradients of the unary and of
    every mixing matrix; and the normalisations themselves are what they say (``n = 1 / K·1``)."""
    g = torch.Generator().manual_seed(4)
    n, c = 25, 3
    features = [torch.rand(2, n, d, generator=g, dtype=torch.float64) * 3 for d in (2, 3, 4)][: len(modes)]
    lattices = [lattice_ops.build(f, backend) for f in features]
    mixing = [torch.randn(c, c, generator=g, dtype=torch.float64) for _ in features]
    if len(modes) == 2:  # two Potts-like kernels: the fused pass of the numba back end, with its splat pre-scales
        mixing = [torch.diag(torch.rand(c, generator=g, dtype=torch.float64) + 1) for _ in features]
    mixing = [a.requires_grad_(True) for a in mixing]
    unary = torch.randn(2, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    q, _ = torch.ops.crfasrnn.mean_field(unary, [t for lat in lattices for t in lat], mixing, modes, 3, True)
    with torch.no_grad():  # the inference path (buffers reused, softmax fused) gives the same scores
        q_inference, _ = torch.ops.crfasrnn.mean_field(
            unary, [t for lat in lattices for t in lat], mixing, modes, 3, False
        )
    torch.testing.assert_close(q_inference, q.detach(), rtol=1e-12, atol=1e-12)

    def message(lattice, p, mode):  # by the definitions, from unnormalised filterings
        raw = lambda v: torch.ops.crfasrnn.lattice_filter(v, lattice, False, 0, 0)  # noqa: E731
        norm = 1 / (raw(torch.ones(2, n, 1, dtype=torch.float64)) + lattice_ops.NORMALISER_EPS)
        return {0: raw(p), 1: raw(norm * p), 2: norm * raw(p), 3: norm.sqrt() * raw(norm.sqrt() * p)}[mode]

    want = unary
    for _ in range(3):
        p = torch.softmax(want, dim=-1)
        want = unary - sum(message(lat, p, mode) @ a for lat, a, mode in zip(lattices, mixing, modes))
    torch.testing.assert_close(q, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn(q.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((q * weights).sum(), [unary, *mixing])
    want = torch.autograd.grad((want * weights).sum(), [unary, *mixing])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_normalisation_modes_are_checked():
    lat = lattice_ops.build(torch.rand(1, 10, 2), BACKENDS[0])
    with pytest.raises(ValueError, match="normalisation mode"):
        torch.ops.crfasrnn.mean_field(torch.randn(1, 10, 2), lat, [torch.eye(2)], [4], 1, False)
    with pytest.raises(ValueError, match="one normalisation mode per kernel"):
        torch.ops.crfasrnn.mean_field(torch.randn(1, 10, 2), lat, [torch.eye(2)], [2, 2], 1, False)


# --- torch.compile and torch.export --------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    from crfasrnn import CrfRnn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.crf = CrfRnn(4, 3, theta_alpha=8.0, theta_beta=20.0, theta_gamma=2.0)

        def forward(self, x):
            return self.crf(self.conv(x / 255), x)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # dense matrices: the general (matrix-product) path
        for p in net.crf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    report = {}
    for mode in ("default", "fullgraph"):
        compiled = torch.compile(net, fullgraph=(mode == "fullgraph"))
        for size in ((20, 28), (33, 17)):
            x = torch.rand(2, 3, *size) * 255
            start = time.perf_counter()
            out = compiled(x)
            out.square().sum().backward()
            got = [out.detach()] + [p.grad.clone() for p in net.parameters()]
            net.zero_grad(set_to_none=True)
            ref = net(x)
            ref.square().sum().backward()
            want = [ref.detach()] + [p.grad.clone() for p in net.parameters()]
            net.zero_grad(set_to_none=True)
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
            report[f"{mode}-{size[0]}x{size[1]}"] = {"rel_err": err, "seconds": time.perf_counter() - start,
                                                     "contiguous": out.is_contiguous()}
    print(json.dumps(report))
    """
)


def test_compile_in_a_fresh_process_with_an_empty_numba_cache(tmp_path):
    """torch.compile (default and fullgraph) before any eager call, forward and backward, two sizes: equals eager."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    script = tmp_path / "compile_check.py"
    script.write_text(_COMPILE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {f"{m}-{s}" for m in ("default", "fullgraph") for s in ("20x28", "33x17")}
    for key, row in report.items():
        assert row["rel_err"] <= 1e-5, (key, row)
        assert row["contiguous"], key
    assert any((tmp_path / "numba").rglob("*.nbi")), "the numba kernels were not compiled into the empty cache"


def test_export_of_a_reduced_crfasrnn_net_equals_eager():
    torch.manual_seed(0)
    net = CrfRnnNet(num_classes=3, num_iterations=2, width=1 / 32).eval()
    x = torch.rand(1, 3, 40, 52) * 255
    with torch.no_grad():
        program = torch.export.export(net, (x,))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert {"crfasrnn.lattice_build.default", "crfasrnn.mean_field.default"} <= targets
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-5)


def test_fake_and_meta_tensors_give_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    crf = CrfRnn(4, 3)
    unary, image = _scene()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = crf(mode.from_tensor(unary), mode.from_tensor(image))
    assert out.shape == unary.shape and out.dtype == torch.float32
    meta = crf.to("meta")(unary.to("meta"), image.to("meta"))
    assert meta.shape == unary.shape and meta.device.type == "meta"


# --- precision -------------------------------------------------------------------------------------------------------


def test_autocast_bfloat16_on_cpu_computes_in_float32():
    torch.manual_seed(0)
    net = CrfRnnNet(num_classes=5, num_iterations=5, width=1 / 16).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(1, 3, 96, 128)
    x[..., :, 64:] = 180
    x[..., 48:, :] += 60
    x += 20 * torch.rand(x.shape, generator=g)
    with torch.no_grad():
        want = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    agreement = (got.argmax(1) == want.argmax(1)).float().mean().item()
    assert agreement >= 0.99, agreement


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_autocast_float16_on_cuda_computes_in_float32():
    unary, image = _scene(1, 4, 60, 80, device="cuda")
    conv = torch.nn.Conv2d(4, 4, 1).cuda()
    crf = CrfRnn(4, 5).cuda()
    with torch.no_grad():
        want = crf(conv(unary), image)
        with torch.autocast("cuda", dtype=torch.float16):
            got = crf(conv(unary), image)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.99


@pytest.mark.parametrize("device,backend", _devices_backends(), ids=str)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_inputs_are_computed_in_float32_and_returned_in_their_dtype(device, backend, half):
    unary, image = _scene(device=device)
    unary, image = unary.to(half), image.to(half)
    crf = CrfRnn(4, 5, backend=backend).to(device)
    got = crf(unary, image)
    want = crf(unary.float(), image.float())  # the same (rounded) inputs in float32
    assert got.dtype == half
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    # gradients flow back to a half unary in its dtype
    u = unary.clone().requires_grad_(True)
    crf(u, image).float().sum().backward()
    assert u.grad.dtype == half and torch.isfinite(u.grad.float()).all()


# --- memory formats, contiguity, determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", _devices_backends(), ids=str)
def test_channels_last_and_non_contiguous_inputs_give_identical_results(device, backend):
    unary, image = _scene(device=device)
    crf = CrfRnn(4, 4, backend=backend).to(device)
    want = crf(unary, image)
    assert want.is_contiguous()
    cl = crf(unary.to(memory_format=torch.channels_last), image.to(memory_format=torch.channels_last))
    wide_u = torch.zeros(2, 9, 18, 46, device=device)
    wide_u[:, 2:6, :, ::2] = unary
    wide_i = torch.zeros(2, 3, 18, 46, device=device)
    wide_i[:, :, :, 1::2] = image
    strided = crf(wide_u[:, 2:6, :, ::2], wide_i[:, :, :, 1::2])
    assert torch.equal(cl, want) and torch.equal(strided, want)
    assert cl.is_contiguous() and strided.is_contiguous()


@pytest.mark.parametrize("device,backend", _devices_backends(), ids=str)
def test_deterministic_mode_gives_bit_identical_repeats(device, backend):
    unary, image = _scene(device=device)
    crf = CrfRnn(4, 4, backend=backend).to(device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            u = unary.clone().requires_grad_(True)
            crf.zero_grad(set_to_none=True)
            out = crf(u, image)
            (out * out).sum().backward()
            runs.append([out.detach(), u.grad] + [p.grad for p in crf.parameters()])
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_finite_check_switch():
    from crfasrnn import set_finite_check

    unary, image = _scene()
    unary[0, 0, 0, 0] = float("nan")
    crf = CrfRnn(4, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        crf(unary, image)
    previous = set_finite_check("never")
    try:
        assert torch.isnan(crf(unary, image)).any()  # not scanned: the NaN propagates
    finally:
        set_finite_check(previous)
    with pytest.raises(ValueError, match="finite-check mode"):
        set_finite_check("sometimes")


# --- processes and threads -----------------------------------------------------------------------------------------


class _RefineDataset(torch.utils.data.Dataset):
    """Each item refines a small scene (the numba kernels run in the worker)."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        rng = np.random.RandomState(index)
        image = np.zeros((24, 32, 3), dtype=np.uint8)
        image[:, 16:] = 200
        labels = (np.arange(32)[None, :].repeat(24, 0) >= 16).astype(np.int64)
        noisy = np.where(rng.rand(24, 32) < 0.2, 1 - labels, labels)
        return torch.as_tensor(refine(image, labels=noisy, num_classes=2))


def test_forked_dataloader_workers_run_the_kernels_after_the_parent_did():
    dataset = _RefineDataset()
    parent = [dataset[i] for i in range(len(dataset))]  # the parent uses the kernels (and their threads) first
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, timeout=300, multiprocessing_context="fork"
    )
    batches = list(loader)
    assert len(batches) == 3
    assert torch.equal(torch.cat(batches), torch.stack(parent))


def _pool_job(seed):
    unary, image = _scene(seed=seed)
    with torch.no_grad():
        return CrfRnn(4, 3)(unary, image)


def test_forked_pool_workers_run_the_kernels_after_the_parent_did():
    want = [_pool_job(s) for s in range(4)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_pool_job, range(4)).get(timeout=300)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_kernels_follow_torch_set_num_threads():
    import numba

    from crfasrnn import _parallel

    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with _parallel.parallel():
                assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
        torch.set_num_threads(1)
        unary, image = _scene()
        one = CrfRnn(4, 3)(unary, image)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(one, CrfRnn(4, 3)(unary, image), rtol=1e-6, atol=1e-6)
    assert _parallel.threading_layer() != "omp"  # GNU OpenMP is neither fork-safe nor idle-friendly


def test_crf_rnn_functional_matches_the_module():
    unary, image = _scene()
    crf = CrfRnn(4, 3)
    got = crf_rnn(unary, image, crf.spatial_weights, crf.bilateral_weights, crf.compatibility, num_iterations=3)
    assert torch.equal(got, crf(unary, image))


_WORKQUEUE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from crfasrnn import CrfRnn, _parallel

    crf = CrfRnn(4, 3)
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(1, 4, 40, 50, generator=g), torch.rand(1, 3, 40, 50, generator=g) * 255) for _ in range(4)]
    with torch.no_grad():
        serial = [crf(u, im) for u, im in inputs]
        with ThreadPoolExecutor(4) as pool:  # four threads launching kernels at once
            threaded = list(pool.map(lambda x: crf(*x), inputs * 3))
    assert all(torch.equal(a, serial[i % 4]) for i, a in enumerate(threaded))
    print(_parallel.threading_layer())
    """
)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_the_workqueue_fallback_is_safe_from_several_threads():
    """Without TBB, numba's workqueue layer aborts the process when two threads launch kernels at once; the kernel
    launches are serialised there, so threads get the serial results."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    proc = subprocess.run(
        [sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "workqueue"
