"""hubconf.py: torch.hub builds the network with its weights (from a local checkout, never the internet)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from synthetic_weights import random_state_dict, write_port_pth

from crfasrnn import CrfRnnNet, load_model

REPO = Path(__file__).resolve().parents[1]


def test_hubconf_dependencies_import():
    """torch.hub refuses a hubconf whose listed dependencies are missing: every one must be importable."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    assert spec is not None and spec.loader is not None
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for name in hubconf.dependencies:
        importlib.import_module(name)
    assert callable(hubconf.crfasrnn_voc)


def test_torch_hub_builds_crfasrnn_voc_with_its_weights(tmp_path):
    path = write_port_pth(tmp_path / "w.pth", random_state_dict(21, width=1 / 16))
    model = torch.hub.load(str(REPO), "crfasrnn_voc", source="local", weights=str(path), num_iterations=2)
    expected, _ = load_model(path, num_iterations=2)
    assert isinstance(model, CrfRnnNet) and not model.training and model.num_iterations == 2
    x = torch.randn(1, 3, 30, 40) * 40
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))


def test_torch_hub_untrained(tmp_path):
    model = torch.hub.load(str(REPO), "crfasrnn_voc", source="local", pretrained=False, num_iterations=1)
    assert isinstance(model, CrfRnnNet) and model.num_classes == 21 and model.num_iterations == 1
