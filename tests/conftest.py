"""Shared fixtures: devices (cpu; cuda where available), dtypes, lattice back ends and the reference case files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crfasrnn.lattice import numba_available

REFERENCE_DIR = Path(__file__).parent / "reference"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


#: A loopback address nothing listens on: a download from it is refused at once.
UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _no_network_and_a_private_weights_cache(tmp_path_factory, monkeypatch):
    """No test may touch the internet or the user's cache: the published names resolve to a refused loopback address
    (``CRFASRNN_WEIGHTS_BASE_URL``) and torch.hub's cache is a fresh folder per test (``TORCH_HOME``). Tests that serve
    weights set the base URL to their own loopback server."""
    monkeypatch.setenv("CRFASRNN_WEIGHTS_BASE_URL", UNREACHABLE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    monkeypatch.delenv("CRFASRNN_WEIGHTS", raising=False)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def _device_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs: the torch path everywhere (it is the CUDA path), numba on CPU."""
    pairs = [(dev, "torch") for dev in DEVICES]
    if numba_available():
        pairs.append(("cpu", "numba"))
    return pairs


@pytest.fixture(params=_device_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def device_backend(request) -> tuple[torch.device, str]:
    dev, backend = request.param
    return torch.device(dev), backend


@pytest.fixture(scope="session")
def case_a() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_DIR / "case_a_small_random.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def case_d() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_DIR / "case_d_permutohedral_raw.npz") as f:
        return {k: f[k] for k in f.files}
