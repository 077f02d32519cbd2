"""The reference case files' inputs are what docs/reference-cases.md says: tools/make_reference_inputs.py rebuilds them
from the documented seeds, bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("make_reference_inputs", REPO / "tools" / "make_reference_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()
CASES = {
    "a": (REPO / "tests" / "reference" / "case_a_small_random.npz", TOOL.case_a_inputs, TOOL.CASE_A_OUTPUTS),
    "d": (REPO / "tests" / "reference" / "case_d_permutohedral_raw.npz", TOOL.case_d_inputs, TOOL.CASE_D_OUTPUTS),
}


def _stored(case: str) -> dict[str, np.ndarray]:
    with np.load(CASES[case][0]) as f:
        return {key: f[key] for key in f.files}


@pytest.mark.parametrize("case", ["a", "d"])
def test_inputs_are_bit_identical(case):
    """Every input array, scalar and matrix: same dtype, same shape, same values (no tolerance: the same
    RandomState draws and float32 divisions give the same bits)."""
    stored = _stored(case)
    generated = CASES[case][1]()
    assert generated, "no inputs generated"
    for key, array in generated.items():
        assert key in stored, key
        assert array.dtype == stored[key].dtype, key
        assert array.shape == stored[key].shape, key
        np.testing.assert_array_equal(array, stored[key], err_msg=key)


@pytest.mark.parametrize("case", ["a", "d"])
def test_every_stored_key_is_an_input_an_output_or_meta(case):
    _, make, outputs = CASES[case]
    stored = _stored(case)
    inputs = set(make())
    meta = {key for key in stored if key.startswith("meta_")}
    assert not inputs & set(outputs)
    assert set(stored) == inputs | set(outputs) | meta
    assert TOOL.compare(make(), stored, outputs) == []


@pytest.mark.parametrize("case", ["a", "d"])
def test_provenance(case):
    """The meta keys name the port and the commit the documentation gives."""
    stored = _stored(case)
    assert str(stored["meta_reference_repo"]) == TOOL.REFERENCE_REPO
    assert str(stored["meta_reference_commit"]) == TOOL.REFERENCE_COMMIT
    assert str(stored["meta_torch_version"]).startswith("2.13.0")


def test_features_are_float32_divisions_not_reciprocal_products():
    """``x / θ`` is what the reference computes; ``x * (1/θ)`` differs in the last bit at many points."""
    stored = _stored("d")
    inputs = TOOL.case_d_inputs()
    colours = stored["image"].astype(np.float32)
    products = colours * np.float32(1 / 25.0)
    assert np.count_nonzero(products != stored["features_bilateral"][..., 2:]) > 100
    np.testing.assert_array_equal(inputs["features_bilateral"][..., 2:], colours / np.float32(25.0))


def test_compare_reports_a_one_ulp_change():
    stored = _stored("a")
    generated = TOOL.case_a_inputs()
    generated["unary"] = generated["unary"].copy()
    generated["unary"].flat[17] = np.nextafter(generated["unary"].flat[17], np.float32(np.inf))
    generated["G"] = generated["G"].astype(np.float64)
    problems = TOOL.compare(generated, stored, TOOL.CASE_A_OUTPUTS)
    assert problems == ["unary: 1 of 3600 values differ", "G: float64(3, 30, 40) generated, float32(3, 30, 40) stored"]
    del generated["theta_beta"]
    assert "theta_beta: stored but neither an input nor a known output" in TOOL.compare(
        generated, stored, TOOL.CASE_A_OUTPUTS
    )


def test_main_reports_success(capsys):
    assert TOOL.main() == 0
    out = capsys.readouterr().out
    assert "case_a_small_random.npz: all 15 input arrays identical" in out
    assert "case_d_permutohedral_raw.npz: all 8 input arrays identical" in out
