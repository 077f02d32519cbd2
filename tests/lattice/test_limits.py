"""The lattice refuses what its arithmetic cannot handle, with one clear error and never a crash.

Features far too large in magnitude (a tiny bandwidth, absurd values) once made the compiled construction write outside
its arrays (SIGSEGV) or return NaN. These tests run such inputs in subprocesses, so that a crash fails the test rather
than the test run, and assert the exit codes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from crfasrnn import CrfRnn, PermutohedralLattice
from crfasrnn.lattice import numba_available
from crfasrnn.lattice._build import max_feature_magnitude

DATA = Path(__file__).resolve().parents[2] / "src" / "crfasrnn" / "data"


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_refine_with_a_tiny_spatial_bandwidth_exits_with_an_error_not_a_segfault(tmp_path):
    from PIL import Image

    photo, labels = tmp_path / "photo.png", tmp_path / "labels.png"
    Image.open(DATA / "astronaut.jpg").convert("RGB").resize((200, 200)).save(photo)
    Image.open(DATA / "astronaut_coarse.png").resize((200, 200), Image.NEAREST).save(labels)
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crfasrnn",
            "refine",
            str(photo),
            "--labels",
            str(labels),
            "-o",
            str(out),
            "--theta-gamma",
            "1e-6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "theta_gamma=1e-06 is too small for a 200x200 image" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_lattice_of_features_divided_by_a_tiny_bandwidth_raises(backend):
    proc = _run(
        """
        import sys, torch
        from crfasrnn import PermutohedralLattice
        yy, xx = torch.meshgrid(torch.arange(200.0), torch.arange(200.0), indexing="ij")
        try:
            PermutohedralLattice(torch.stack([xx, yy])[None] / 1e-6, backend=sys.argv[1])
        except ValueError as error:
            print("ValueError:", error)
        """,
        backend,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ValueError: lattice feature" in proc.stdout and "vertices" in proc.stdout


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_the_compiled_construction_guards_its_own_indices():
    """The compiled build checks the magnitudes in its first pass; and even past that check (switched off here), a
    point whose simplex cannot be found raises."""
    proc = _run(
        """
        import torch
        from crfasrnn.lattice import _numba
        points = torch.rand(1, 40000, 2, generator=torch.Generator().manual_seed(0)) * 2e8
        for check in (True, False):
            if not check:
                _numba.check_magnitudes = lambda *args: None
            try:
                _numba.build_lattice(points)
            except ValueError as error:
                print("ValueError:", error)
        """
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith("ValueError: lattice feature 0 reaches 2e+08"), first
    assert second.startswith("ValueError: lattice features too large"), second


def test_huge_image_values_and_tiny_bandwidths_name_the_bandwidth():
    crf = CrfRnn(3, 2)
    unary = torch.randn(1, 3, 30, 40)
    image = torch.rand(1, 3, 30, 40)
    with pytest.raises(ValueError, match=r"theta_beta=3\b.*lattice feature [234] reaches"):
        crf(unary, image * 1e25)
    with pytest.raises(ValueError, match="theta_gamma=1e-20 is too small for a 30x40 image"):
        CrfRnn(3, 2, theta_gamma=1e-20)(unary, image)
    with pytest.raises(ValueError, match="theta_alpha=1e-08 is too small"):
        CrfRnn(3, 2, theta_alpha=1e-8)(unary, image)


def test_the_limit_is_what_the_lattice_handles():
    """Just inside the magnitude limit the lattice is built and filters to finite values; just outside it is refused.
    (One feature: with several, features spread that wide also exceed the 64-bit vertex codes, a separate error.)"""
    for dtype in (torch.float32, torch.float64):
        limit = max_feature_magnitude(1, dtype)
        inside = torch.tensor([0.0, limit * 0.99, -limit * 0.99, 1.5], dtype=dtype).reshape(1, 1, 1, 4)
        lattice = PermutohedralLattice(inside)
        assert torch.isfinite(lattice.filter(torch.ones(1, 2, 1, 4, dtype=dtype))).all()
        with pytest.raises(ValueError, match="lattice feature 0 reaches"):
            PermutohedralLattice(inside * (1.01 / 0.99))
    wide = torch.tensor([[0.0, 0.0], [1e5, -1e5], [-1e5, 1e5]], dtype=torch.float64).t().reshape(1, 2, 1, 3)
    with pytest.raises(ValueError, match="span too large a range to index"):
        PermutohedralLattice(wide * 1e4)


_FUZZ = """
import json, sys, time
import numpy as np
import torch
from crfasrnn import CrfRnn, refine
from crfasrnn.lattice import PermutohedralLattice

cases = json.loads(sys.argv[1])
for case in cases:
    rng = np.random.RandomState(case["seed"])
    h, w = case["size"]
    dtype = getattr(torch, case["dtype"])
    start = time.perf_counter()
    try:
        if case["what"] == "lattice":
            feats = (torch.from_numpy(rng.rand(1, 3, h, w)) * case["scale"] / case["theta"]).to(dtype)
            lattice = PermutohedralLattice(feats, backend=case["backend"])
            out = lattice.filter(torch.ones(1, 2, h, w, dtype=lattice.dtype), normalize=True)
        elif case["what"] == "refine":  # photos are uint8: the bandwidths and sizes vary
            image = (rng.rand(h, w, 3) * 255).astype(np.uint8)
            labels = (rng.rand(h, w) < 0.5).astype(np.int64)
            _, probs = refine(image, labels=labels, num_classes=2, num_iterations=2, theta_alpha=case["theta"],
                              theta_beta=case["theta"], theta_gamma=case["theta"], return_probs=True,
                              backend=case["backend"])
            out = torch.as_tensor(probs)
        else:  # the layer: any floating image, at any scale, in any dtype
            crf = CrfRnn(2, 2, theta_alpha=case["theta"], theta_beta=case["theta"], theta_gamma=case["theta"],
                         backend=case["backend"])
            unary = torch.from_numpy(rng.randn(1, 2, h, w)).to(dtype)
            image = (torch.from_numpy(rng.rand(1, 3, h, w)) * case["scale"]).to(dtype)
            with torch.no_grad():
                out = crf(unary, image)
        result = "finite" if bool(torch.isfinite(out.float()).all()) else "NON-FINITE"
    except ValueError as error:
        result = "ValueError"
        if "lattice" not in str(error) and "theta" not in str(error) and "NaN or Inf" not in str(error):
            result = "OTHER ValueError: " + str(error)  # the refusal must be the lattice's, not some other
    print(json.dumps({**case, "result": result, "seconds": round(time.perf_counter() - start, 2)}), flush=True)
"""


def _fuzz_cases(count: int, seed: int) -> list[dict]:
    rng = np.random.RandomState(seed)
    cases = []
    for k in range(count):
        big = k % 10 == 0  # a few large images, the rest small
        side = (lambda: int(rng.randint(1000, 2001))) if big else (lambda: int(np.exp(rng.uniform(0, np.log(400)))))
        cases.append(
            {
                "seed": k,
                "what": ("lattice", "refine", "crf")[k % 3],
                "size": [side(), side()],
                "theta": float(10 ** rng.uniform(-8, 8)),
                "scale": float(0.0 if k % 7 == 3 else 10 ** rng.uniform(-3, 30)),
                "dtype": str(rng.choice(["float32", "float64", "float16", "bfloat16"])),
                "backend": "torch" if (k % 5 == 4 and not big) or not numba_available() else "auto",
            }
        )
    return cases


def test_fuzz_of_bandwidths_sizes_scales_and_dtypes_ends_in_a_result_or_a_value_error():
    """Random bandwidths (1e-8 … 1e8), sizes (1×1 … 2000×2000), value scales (0 … 1e30) and dtypes through the lattice
    and ``refine``: every case gives finite values or a ValueError; no crash, no hang (bounded time), no NaN."""
    cases = _fuzz_cases(36, seed=12)
    proc = _run(_FUZZ, json.dumps(cases), timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases)
    assert all(row["result"] in ("finite", "ValueError") for row in rows), [
        r for r in rows if r["result"] not in ("finite", "ValueError")
    ]
    assert {"finite", "ValueError"} <= {row["result"] for row in rows}  # both outcomes are exercised
    assert max(row["seconds"] for row in rows) < 120
