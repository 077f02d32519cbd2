"""The Keras port's .h5 (crfrnn_keras_model.h5): read with h5py, the same weights as the .pth and the .caffemodel."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic_weights import keras_arrays, random_state_dict, write_caffemodel, write_keras_h5, write_port_pth

from crfasrnn import VOC_CLASSES, CrfRnnNet
from crfasrnn.errors import MissingDependencyError
from crfasrnn.weights import (
    KERAS_LAYERS,
    WeightsError,
    compose_keys,
    convert_keras_weights,
    convert_weights,
    detect_format,
    file_sha256,
    load_model,
    load_weights,
    read_keras_h5,
    read_weights,
)

WIDTH = 1 / 16


@pytest.fixture(scope="module")
def h5py():
    return pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_state_dict(21, width=WIDTH, seed=7)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 41, 38, generator=gen) * 255 - 120


def _net() -> CrfRnnNet:
    return CrfRnnNet(21, num_iterations=2, width=WIDTH).eval()


def _logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("full_model", [True, False], ids=["model.save", "save_weights"])
def test_h5_pth_and_caffemodel_give_the_same_network(tmp_path, h5py, weights, image, full_model):
    files = {
        "keras-h5": write_keras_h5(tmp_path / "crfrnn_keras_model.h5", weights, full_model=full_model),
        "port-pth": write_port_pth(tmp_path / "crfasrnn_weights.pth", weights),
        "caffe-v1": write_caffemodel(tmp_path / "TVG_CRFRNN_COCO_VOC.caffemodel", weights),
    }
    assert detect_format(files["keras-h5"]) == "hdf5"
    state_dicts, outputs = {}, {}
    for fmt, path in files.items():
        state_dicts[fmt], info = read_weights(path)
        assert info.format == fmt and info.num_classes == 21 and info.classes == VOC_CLASSES
        assert info.metadata["width"] == WIDTH and info.sha256 == file_sha256(path)
        model, _ = load_model(path, num_iterations=2)
        assert isinstance(model, CrfRnnNet)
        outputs[fmt] = _logits(model, image)
    ours = compose_keys(weights)
    for fmt, state_dict in state_dicts.items():
        assert set(state_dict) == set(ours), fmt
        for key, value in ours.items():
            assert torch.equal(state_dict[key], value), (fmt, key)
    reference = _net()
    reference.load_state_dict(ours)
    expected = _logits(reference, image)
    assert not torch.allclose(expected, reference.unary(image))  # the CRF does something
    for fmt, logits in outputs.items():
        assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5), fmt
    net = _net()  # and into an existing model
    info = load_weights(net, files["keras-h5"])
    assert info.format == "keras-h5" and torch.equal(_logits(net, image), outputs["keras-h5"])


def test_keras_layouts_and_sign(tmp_path, h5py, weights):
    """Kernels channels-last (Conv2D (h, w, in, out), Conv2DTranspose (h, w, out, in)); the CRF in Caffe's sign."""
    path = write_keras_h5(tmp_path / "k.h5", weights)
    with h5py.File(path, "r") as f:
        fc6 = f["/model_weights/fc6/fc6/kernel:0"][()]
        upscore2 = f["/model_weights/score2/score2/kernel:0"][()]
        compatibility = f["/model_weights/crfrnn/crfrnn/compatibility_matrix:0"][()]
        assert list(f["model_weights/conv1_1"].attrs["weight_names"]) == [b"conv1_1/kernel:0", b"conv1_1/bias:0"]
        assert f["model_weights/pool1"].attrs["weight_names"].size == 0 and not list(f["model_weights/pool1"])
    out_ch, in_ch = weights["fc6.weight"].shape[:2]
    assert fc6.shape == (7, 7, in_ch, out_ch)
    assert fc6[2, 5, 3, 1] == weights["fc6.weight"][1, 3, 2, 5].item()  # [h, w, in, out] = ours[out, in, h, w]
    assert upscore2.shape == (4, 4, 21, 21)
    assert upscore2[1, 3, 4, 9] == weights["upscore2.weight"][9, 4, 1, 3].item()  # [h, w, out, in] = [in, out, h, w]
    assert np.array_equal(compatibility, weights["crf.compatibility"].numpy())  # no change of sign
    state_dict, _ = read_weights(path)
    assert torch.equal(state_dict["crf.compatibility"], torch.from_numpy(compatibility))
    assert torch.equal(state_dict["backbone.upscore8.weight"], weights["upscore8.weight"])


def test_read_keras_h5_gives_the_layers(tmp_path, h5py, weights):
    layers = read_keras_h5(write_keras_h5(tmp_path / "k.h5", weights, full_model=False))
    assert set(layers) == set(KERAS_LAYERS)  # the layers without weights are left out
    assert set(layers["score4"]) == {"kernel"} and set(layers["crfrnn"]) == {
        "spatial_ker_weights",
        "bilateral_ker_weights",
        "compatibility_matrix",
    }
    converted = convert_keras_weights(layers)
    assert all(torch.equal(converted[k], v) for k, v in weights.items())


def test_datasets_named_by_position(tmp_path, h5py, weights):
    """Names that say nothing (param_0, param_1): matched by position in weight_names, as Keras's load_weights does."""
    state_dict, info = read_weights(write_keras_h5(tmp_path / "p.h5", weights, generic_names=True))
    assert info.format == "keras-h5"
    assert all(torch.equal(state_dict[k], v) for k, v in compose_keys(weights).items())


def test_convert_accepts_h5(tmp_path, h5py, weights):
    src = write_keras_h5(tmp_path / "crfrnn_keras_model.h5", weights)
    info = convert_weights(src, tmp_path / "voc.safetensors")
    assert info.metadata["source_format"] == "keras-h5" and info.metadata["source_file"] == src.name
    assert info.metadata["source_sha256"] == file_sha256(src)
    state_dict, read_info = read_weights(tmp_path / "voc.safetensors")
    assert read_info.format == "safetensors"
    assert all(torch.equal(state_dict[k], v) for k, v in compose_keys(weights).items())


# ------------------------------------------------------------------------------------------------ bad files


def _expect_error(path, match, *, exc=WeightsError):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(exc, match=match):
        load_weights(net, path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing loaded half-way


def test_missing_layer_names_the_dataset(tmp_path, h5py, weights):
    _expect_error(
        write_keras_h5(tmp_path / "m.h5", weights, skip_layer="score-pool3"),
        r"m\.h5: Keras layer 'score-pool3' is missing: no dataset /model_weights/score-pool3/score-pool3/kernel:0 "
        r"\(it holds score_pool3\.weight, score_pool3\.bias\)",
    )
    _expect_error(
        write_keras_h5(tmp_path / "c.h5", weights, skip_layer="crfrnn", full_model=False),
        r"Keras layer 'crfrnn' is missing: no dataset /crfrnn/crfrnn/spatial_ker_weights:0",
    )


def test_missing_dataset(tmp_path, h5py, weights):
    _expect_error(
        write_keras_h5(tmp_path / "d.h5", weights, skip_weight=("fc7", "bias")),
        r"d\.h5: dataset /model_weights/fc7/fc7/bias:0 is missing \(our fc7\.bias; the group holds "
        r"/model_weights/fc7/fc7/kernel:0\)",
    )
    path = write_keras_h5(tmp_path / "listed.h5", weights)
    with h5py.File(path, "r+") as f:
        del f["model_weights/score4/score4/kernel:0"]  # still listed in weight_names
    _expect_error(path, r"dataset /model_weights/score4/score4/kernel:0 is missing \(its weight_names list it\)")


def test_wrong_shape(tmp_path, h5py, weights):
    fc7 = keras_arrays(weights)["fc7"]["kernel"]
    wrong = np.zeros((1, 1, fc7.shape[2], fc7.shape[3] + 1), np.float32)
    _expect_error(
        write_keras_h5(tmp_path / "s.h5", weights, replace={("fc7", "kernel"): wrong}),
        r"tensor 'backbone\.fc7\.weight' has shape \(257, 256, 1, 1\) but the model expects \(256, 256, 1, 1\)",
    )
    _expect_error(
        write_keras_h5(tmp_path / "n.h5", weights, replace={("fc7", "kernel"): fc7[0, 0]}),
        r"Keras weight 'fc7/kernel' has shape \(256, 256\), expected 4 dimensions \(our fc7\.weight\)",
    )
    _expect_error(
        write_keras_h5(tmp_path / "i.h5", weights, replace={("fc6", "bias"): np.zeros(256, np.int32)}),
        r"dataset /model_weights/fc6/fc6/bias:0 has dtype int32, expected floating point",
    )


def test_unexpected_layer_and_weight(tmp_path, h5py, weights):
    _expect_error(
        write_keras_h5(tmp_path / "u.h5", weights, extra_layer="fc8"),
        "unexpected Keras layers with weights: fc8",
    )
    _expect_error(  # score4 has no bias (use_bias=False)
        write_keras_h5(tmp_path / "b.h5", weights, replace={("score4", "bias"): np.zeros(21, np.float32)}),
        r"Keras layer 'score4' has unexpected weights: /model_weights/score4/score4/bias:0",
    )


def test_truncated_h5(tmp_path, h5py, weights):
    data = write_keras_h5(tmp_path / "full.h5", weights).read_bytes()
    for fraction in (0.9, 0.5, 0.01):
        cut = tmp_path / f"cut{fraction}.h5"
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert detect_format(cut) == "hdf5"
        _expect_error(cut, "not a readable HDF5 file \\(truncated\\?\\)")


def test_h5py_missing(tmp_path, monkeypatch):
    path = tmp_path / "crfrnn_keras_model.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(512))
    monkeypatch.setitem(sys.modules, "h5py", None)
    _expect_error(path, r"needs h5py: pip install 'crfasrnn\[keras\]'", exc=MissingDependencyError)
    with pytest.raises(MissingDependencyError, match=r"crfasrnn\[keras\]"):
        convert_weights(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_importing_crfasrnn_does_not_import_h5py():
    code = "import sys, crfasrnn, crfasrnn.weights; assert 'h5py' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
