"""crfasrnn.engine: the general dense CRF — any kernels, 1-D to 3-D, every normalisation, weights and compatibilities
in three forms — against a written-out mean field, CrfRnn as its configuration, gradients, batches and errors."""

from __future__ import annotations

import math

import pytest
import torch

from crfasrnn import CrfRnn
from crfasrnn.engine import (
    NORMALIZATIONS,
    DenseCRF,
    GaussianKernel,
    dense_crf,
    guided_features,
    position_features,
    position_lattice,
)
from crfasrnn.lattice import PermutohedralLattice


def _loop(unary, features, weights, compat, norms, iterations, backend):
    """The mean field written out with the lattice's own filter: q = u − Σ_k norm_k(K_k softmax(q)) (M_k W_k)ᵀ."""
    b, c = unary.shape[:2]
    u = unary.reshape(b, c, -1).transpose(1, 2)
    lattices = [PermutohedralLattice(f.to(unary.dtype), backend=backend) for f in features]
    mixing = [(m @ w).t() for w, m in zip(weights, compat)]
    q = u
    for _ in range(iterations):
        p = torch.softmax(q, dim=-1)
        total = u
        for lattice, a, norm in zip(lattices, mixing, norms):
            n = lattice.normalizer
            if norm == "none":
                msg = lattice.filter_points(p)
            elif norm == "before":
                msg = lattice.filter_points(n * p)
            elif norm == "after":
                msg = n * lattice.filter_points(p)
            else:
                msg = n.sqrt() * lattice.filter_points(n.sqrt() * p)
            total = total - msg @ a
        q = total
    return q.transpose(1, 2).reshape(unary.shape)


def _matrix(form, c, gen):
    if form == "scalar":
        return torch.tensor(1.5)
    if form == "vector":
        return torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return torch.rand(c, c, generator=gen, dtype=torch.float64) - 0.3


def _as_matrix(x, c):
    return x * torch.eye(c, dtype=torch.float64) if x.ndim == 0 else torch.diag(x) if x.ndim == 1 else x


@pytest.mark.parametrize("shape", [(40,), (9, 11), (4, 5, 6)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("norm", list(NORMALIZATIONS))
@pytest.mark.parametrize("form", ["scalar", "vector", "matrix"])
def test_dense_crf_equals_the_written_out_mean_field(device_backend, shape, norm, form):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(len(shape) * 7 + len(norm))
    c = 3
    unary = torch.randn(2, c, *shape, generator=gen, dtype=torch.float64)
    guide = torch.rand(2, 2, *shape, generator=gen, dtype=torch.float64) * 4
    features = [position_features(shape, 2.0, like=unary), guided_features(guide, 3.0, (1.0, 2.0))]
    weights = [_matrix(form, c, gen), torch.tensor(0.7, dtype=torch.float64)]
    compat = [torch.tensor(-1.0, dtype=torch.float64), _matrix(form, c, gen)]
    got = dense_crf(
        unary.to(device),
        [f.to(device) for f in features],
        [w.to(device) for w in weights],
        [m.to(device) for m in compat],
        normalization=norm,
        num_iterations=3,
        backend=backend,
    )
    want = _loop(
        unary,
        features,
        [_as_matrix(w, c) for w in weights],
        [_as_matrix(m, c) for m in compat],
        [norm, norm],
        3,
        "torch",
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)


def test_energies_are_negated_scores_and_zero_iterations_return_the_unary():
    unary = torch.randn(1, 3, 8, 9)
    f = [position_features((8, 9), 2.0)]
    torch.testing.assert_close(dense_crf(unary, f, 2.0, unary_kind="energies"), dense_crf(-unary, f, 2.0))
    assert dense_crf(unary, f, num_iterations=0) is unary
    torch.testing.assert_close(dense_crf(unary, f, num_iterations=0, unary_kind="energies"), -unary)


def test_crf_rnn_is_a_configuration_of_the_engine(device_backend):
    """CrfRnn's layer and DenseCRF with CRF-RNN's kernels (normalised after, shared M) give the same scores."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(3)
    unary = torch.randn(2, 4, 12, 15, generator=gen)
    image = torch.rand(2, 3, 12, 15, generator=gen) * 255
    layer = CrfRnn(4, 5, theta_alpha=9.0, theta_beta=20.0, theta_gamma=2.0, backend=backend).to(device)
    with torch.no_grad():
        layer.spatial_weights.copy_(torch.rand(4, 4, generator=gen))
        layer.compatibility.add_(torch.rand(4, 4, generator=gen) * 0.3)
    engine = DenseCRF(
        4,
        [
            GaussianKernel(positions=2.0, weight=layer.spatial_weights.detach().cpu(), normalization="after"),
            GaussianKernel(
                positions=9.0, guide=20.0, weight=layer.bilateral_weights.detach().cpu(), normalization="after"
            ),
        ],
        num_iterations=5,
        compatibility=layer.compatibility.detach().cpu(),
        backend=backend,
    ).to(device)
    want = layer(unary.to(device), image.to(device))
    torch.testing.assert_close(engine(unary.to(device), image.to(device)), want, rtol=0, atol=0)


def test_batch_equals_loop_and_shared_features_equal_repeated_ones():
    gen = torch.Generator().manual_seed(5)
    unary = torch.randn(3, 2, 5, 6, 7, generator=gen)
    guide = torch.rand(3, 1, 5, 6, 7, generator=gen)
    crf = DenseCRF(
        2,
        [
            GaussianKernel(positions=(1.0, 2.0, 2.0), weight=1.0),
            GaussianKernel(positions=3.0, guide=0.2, weight=torch.tensor([1.0, 2.0])),
        ],
    )
    batch = crf(unary, guide, spacing=(2.0, 1.0, 1.0))
    for i in range(3):
        one = crf(unary[i : i + 1], guide[i : i + 1], spacing=(2.0, 1.0, 1.0))
        torch.testing.assert_close(batch[i : i + 1], one, rtol=1e-5, atol=1e-5)
    shared = position_features((5, 6, 7), 2.0)
    torch.testing.assert_close(
        dense_crf(unary, [shared]), dense_crf(unary, [shared.expand(3, -1, -1, -1, -1)]), rtol=1e-5, atol=1e-5
    )


def test_gradcheck_unary_weights_and_compatibility():
    gen = torch.Generator().manual_seed(1)
    unary = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(2, 1, 4, 5, generator=gen, dtype=torch.float64)
    features = [position_features((4, 5), 1.5, like=unary), guided_features(guide, 2.0, 0.3)]
    vector = torch.rand(3, generator=gen, dtype=torch.float64, requires_grad=True)
    matrix = torch.rand(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scalar = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    for norm in NORMALIZATIONS:

        def f(u, v, m, s, norm=norm):
            return dense_crf(u, features, [v, 1.0], [s, m], normalization=norm, num_iterations=3)

        assert torch.autograd.gradcheck(f, (unary, vector, matrix, scalar), eps=1e-6, atol=1e-6)


def test_module_parameters_learn_in_their_form():
    crf = DenseCRF(
        3,
        [GaussianKernel(positions=2.0, weight=2.0), GaussianKernel(guide=0.5, weight=[1.0, 2.0, 3.0])],
        compatibility=torch.eye(3) * -1,
    )
    assert [tuple(w.shape) for w in crf.weights] == [(), (3,)] and crf.compatibility.shape == (3, 3)
    unary, guide = torch.randn(1, 3, 6, 7), torch.rand(1, 2, 6, 7)
    crf(unary, guide).square().sum().backward()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in crf.weights)
    assert crf.compatibility.grad.abs().sum() > 0
    frozen = DenseCRF(3, [GaussianKernel(positions=2.0)], learnable=False)
    assert list(frozen.parameters()) == [] and "compatibility" in dict(frozen.named_buffers())


def test_given_features_and_guide_only_kernels():
    gen = torch.Generator().manual_seed(2)
    unary, guide = torch.randn(2, 2, 30, generator=gen), torch.rand(2, 3, 30, generator=gen)
    embedding = torch.randn(2, 4, 30, generator=gen)
    crf = DenseCRF(2, [GaussianKernel(weight=1.0), GaussianKernel(guide=(0.5, math.inf, 0.5), weight=2.0)])
    got = crf(unary, guide, features=[embedding])
    want = dense_crf(unary, [embedding, torch.cat([guide[:, :1], guide[:, 2:]], 1) / 0.5], [1.0, 2.0])
    torch.testing.assert_close(got, want)


def test_position_features_order_spacing_and_the_cached_lattice():
    f = position_features((2, 3, 4), (1.0, 2.0, 4.0), spacing=(3.0, 1.0, 2.0))
    assert f.shape == (1, 3, 2, 3, 4)
    # last axis first: (x, y, z) = (w · 2 / 4, h · 1 / 2, d · 3 / 1)
    torch.testing.assert_close(f[0, :, 1, 2, 3], torch.tensor([1.5, 1.0, 3.0]))
    a = position_lattice((6, 7), 2.0)
    b = position_lattice((6, 7), 2.0)
    assert a.tensors[0] is b.tensors[0]  # kept
    v = torch.rand(1, 42, 2)
    direct = PermutohedralLattice(position_features((6, 7), 2.0))
    torch.testing.assert_close(a.filter_points(v), direct.filter_points(v))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dense_crf(torch.randn(1, 2), [torch.randn(1, 2, 3)]), "1 to 3 spatial"),
        (lambda: dense_crf(torch.randn(1, 2, 5), []), "non-empty"),
        (lambda: dense_crf(torch.randn(2, 2, 5), [torch.randn(3, 1, 5)]), r"\(2 or 1, d, 5\)"),
        (lambda: dense_crf(torch.randn(1, 2, 5), [torch.randn(1, 1, 5)], torch.ones(3)), r"\(2,\) vector"),
        (lambda: dense_crf(torch.randn(1, 2, 5), [torch.randn(1, 1, 5)], [1.0, 2.0]), "one value per kernel"),
        (lambda: dense_crf(torch.randn(1, 2, 5), [torch.randn(1, 1, 5)], normalization="full"), "normalization"),
        (lambda: dense_crf(torch.randn(1, 2, 5), [torch.randn(1, 1, 5)], unary_kind="logits"), "unary_kind"),
        (lambda: position_features((3, 4), (1.0, 2.0, 3.0)), "bandwidth needs 1 or 2"),
        (lambda: position_features((3, 4), -1.0), "bandwidth"),
        (lambda: GaussianKernel(positions=0.0), "positions"),
        (lambda: DenseCRF(2, [GaussianKernel(guide=1.0)])(torch.randn(1, 2, 5)), "no guide"),
        (lambda: DenseCRF(2, [GaussianKernel()])(torch.randn(1, 2, 5)), "come with the call"),
        (lambda: DenseCRF(2, [GaussianKernel(positions=1e-9)])(torch.randn(1, 2, 50, 50)), "too small"),
        (lambda: DenseCRF(3, [GaussianKernel(positions=1.0)])(torch.randn(1, 2, 5)), "2 classes but the CRF has 3"),
    ],
)
def test_bad_input_raises_one_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


_COMPILE_SCRIPT = """
import json, torch
from crfasrnn import DenseCRF, GaussianKernel

torch.manual_seed(0)
crf = DenseCRF(3, [GaussianKernel(positions=(1.0, 2.0, 2.0), weight=torch.rand(3)),
                   GaussianKernel(positions=3.0, guide=(0.2, 0.4), weight=torch.rand(3, 3), normalization="after")],
               num_iterations=3, compatibility=torch.rand(3, 3) - 1)
report = {}
for fullgraph in (False, True):
    compiled = torch.compile(crf, fullgraph=fullgraph)
    for shape in ((4, 6, 7), (5, 3, 8)):
        unary = torch.randn(2, 3, *shape, requires_grad=True)
        guide = torch.rand(2, 2, *shape)
        results = []
        for fn in (compiled, crf):
            out = fn(unary, guide, spacing=(2.0, 1.0, 1.0))
            grads = torch.autograd.grad(out.square().sum(), [unary, *crf.parameters()])
            results.append([out.detach(), *grads])
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))
        report[f"{fullgraph}-{shape}"] = err
exported = torch.export.export(crf, (torch.randn(1, 3, 4, 6, 7), torch.rand(1, 2, 4, 6, 7)))
targets = sorted(
    {str(n.target) for n in exported.graph.nodes if n.op == "call_function" and "crfasrnn" in str(n.target)}
)
x = (torch.randn(1, 3, 4, 6, 7), torch.rand(1, 2, 4, 6, 7))
export_err = float((exported.module()(*x) - crf(*x)).abs().max())
print(json.dumps({"compile": report, "targets": targets, "export_err": export_err}))
"""


def test_compiled_and_exported_3d_crf_equal_eager(tmp_path):
    """torch.compile (default and fullgraph) of a 3-D DenseCRF with a guide, forward and backward, two sizes, and
    torch.export: equal to eager (in a fresh process, so that dynamo stays out of the other tests)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "compile_engine.py"
    script.write_text(_COMPILE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["compile"]) == 4 and max(report["compile"].values()) <= 1e-5, report
    assert {"crfasrnn.lattice_build.default", "crfasrnn.mean_field.default"} <= set(report["targets"]), report
    assert report["export_err"] <= 1e-5, report


def test_compact_lattices_give_the_same_crf():
    """compact=True (lattices without splat lists, for large volumes) changes only the order of the splat's sums."""
    gen = torch.Generator().manual_seed(8)
    unary, guide = torch.randn(2, 3, 9, 10, 11, generator=gen), torch.rand(2, 1, 9, 10, 11, generator=gen)
    kernels = [GaussianKernel(positions=2.0, weight=2.0), GaussianKernel(positions=3.0, guide=0.2, weight=4.0)]
    default, compact = DenseCRF(3, kernels), DenseCRF(3, kernels, compact=True)
    torch.testing.assert_close(compact(unary, guide), default(unary, guide), rtol=1e-5, atol=1e-5)
    lattice = position_lattice((9, 10, 11), 2.0, compact=True)
    assert lattice.tensors[5].numel() == 0 and position_lattice((9, 10, 11), 2.0).tensors[5].numel() > 0
