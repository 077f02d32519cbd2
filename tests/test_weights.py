"""Weight files: Caffe V1/V2, the port's .pth, our safetensors/torch format; conversions, metadata and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic_weights import random_state_dict, write_caffemodel, write_port_pth

from crfasrnn import VOC_CLASSES, CrfRnnNet, FCN8s
from crfasrnn.weights import (
    PAPER,
    VGG16_TORCHVISION_KEYS,
    WeightsError,
    caffe_messages,
    compose_keys,
    convert_weights,
    detect_format,
    file_sha256,
    load_model,
    load_weights,
    read_caffemodel,
    read_weights,
    save_weights,
)

WIDTH = 1 / 16


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """In the flat layout, which the published formats' writers take (FCN-8s keys next to crf.*)."""
    return random_state_dict(21, width=WIDTH, seed=3)


@pytest.fixture(scope="module")
def ours(weights) -> dict[str, torch.Tensor]:
    """The same tensors under CrfRnnNet's keys (backbone.*, crf.*)."""
    return compose_keys(weights)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 37, 45, generator=gen) * 255 - 120


def _net(num_classes: int = 21, width: float = WIDTH) -> CrfRnnNet:
    return CrfRnnNet(num_classes, num_iterations=2, width=width).eval()


def _logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def _write_all(tmp_path, weights):
    files = {
        "caffe-v1": write_caffemodel(tmp_path / "v1.caffemodel", weights, v1=True, legacy_shapes=True),
        "caffe-v2": write_caffemodel(tmp_path / "v2.caffemodel", weights, v1=False, legacy_shapes=False),
        "port-pth": write_port_pth(tmp_path / "port.pth", weights),
    }
    ours = tmp_path / "ours.safetensors"
    save_weights(weights, ours)
    files["safetensors"] = ours
    torch_file = tmp_path / "ours.pt"
    save_weights(weights, torch_file)
    files["torch"] = torch_file
    plain = tmp_path / "plain.pt"
    torch.save(weights, plain)
    files["torch-plain"] = plain
    return files


def test_every_format_gives_identical_logits(tmp_path, weights, ours, image):
    reference = _net()
    reference.load_state_dict(ours)
    expected = _logits(reference, image)
    assert not torch.allclose(expected, reference.unary(image))  # the CRF does something
    for fmt, path in _write_all(tmp_path, weights).items():
        net = _net()
        info = load_weights(net, path)
        assert info.format == fmt.replace("-plain", "")
        assert detect_format(path) == {
            "caffe-v1": "caffe",
            "caffe-v2": "caffe",
            "port-pth": "torch",
            "torch-plain": "torch",
        }.get(fmt, fmt)
        for key, value in ours.items():
            assert torch.equal(net.state_dict()[key], value), (fmt, key)
        assert torch.equal(_logits(net, image), expected), fmt
        assert info.num_classes == 21 and info.classes == VOC_CLASSES
        assert info.sha256 == file_sha256(path)


def test_port_compatibility_sign_is_flipped(tmp_path, weights):
    path = write_port_pth(tmp_path / "port.pth", weights)
    port = torch.load(path, weights_only=True)
    assert torch.equal(port["crfrnn.compatibility_matrix"], -weights["crf.compatibility"])
    state_dict, info = read_weights(path)
    assert info.format == "port-pth"
    assert torch.equal(state_dict["crf.compatibility"], -port["crfrnn.compatibility_matrix"])
    assert torch.equal(state_dict["crf.spatial_weights"], port["crfrnn.spatial_ker_weights"])
    # The contract: the port's file through plain load_state_dict fails loudly instead of loading the wrong sign.
    with pytest.raises(RuntimeError, match=r"crfrnn\.compatibility_matrix"):
        _net().load_state_dict(port)


def test_caffe_reader_gives_caffe_shapes_and_versions(tmp_path, weights):
    blobs, version = read_caffemodel(write_caffemodel(tmp_path / "a.caffemodel", weights, v1=True))
    assert version == "caffe-v1"
    assert blobs["conv1_1"][1].shape == (1, 1, 1, 4)  # legacy 4-D bias shape
    assert blobs["inference1"][2].shape == (1, 1, 21, 21)
    assert np.array_equal(blobs["inference1"][2][0, 0], weights["crf.compatibility"].numpy())  # Caffe sign = ours
    assert "crop" not in blobs and "relu1_1" not in blobs  # layers without weights
    blobs, version = read_caffemodel(
        write_caffemodel(tmp_path / "b.caffemodel", weights, v1=False, legacy_shapes=False)
    )
    assert version == "caffe-v2" and blobs["conv1_1"][1].shape == (4,)


def test_caffe_unpacked_and_double_arrays(tmp_path, weights, ours):
    """Files whose float arrays are not packed, or stored as double_data, read the same."""
    from google.protobuf import descriptor_pool, message_factory

    from crfasrnn.weights.caffe import _caffe_file_descriptor

    fd = _caffe_file_descriptor(raw=False)
    for message in fd.message_type:
        for field in message.field:
            field.options.packed = False
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    net_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("crfasrnn_caffe.NetParameter"))
    packed = caffe_messages().NetParameter.FromString(write_caffemodel(tmp_path / "p.caffemodel", weights).read_bytes())
    unpacked = net_cls.FromString(packed.SerializeToString())
    # the doubles: move one layer's values to double_data
    layer = next(lay for lay in unpacked.layers if lay.name == "fc7")
    for blob in layer.blobs:
        values = list(blob.data)
        del blob.data[:]
        blob.double_data.extend(values)
    path = tmp_path / "u.caffemodel"
    path.write_bytes(unpacked.SerializeToString())
    assert len(path.read_bytes()) > len((tmp_path / "p.caffemodel").read_bytes())  # really another encoding
    state_dict, info = read_weights(path)
    assert info.format == "caffe-v1"
    for key, value in ours.items():
        assert torch.equal(state_dict[key], value), key


def test_metadata_travels(tmp_path, weights, ours):
    src = write_caffemodel(tmp_path / "TVG_CRFRNN_COCO_VOC.caffemodel", weights)
    dst = tmp_path / "out" / "crfasrnn_voc.safetensors"
    info = convert_weights(src, dst)
    assert info.sha256 == file_sha256(dst)
    state_dict, read_info = read_weights(dst)
    meta = read_info.metadata
    assert meta["source_file"] == src.name
    assert meta["source_sha256"] == file_sha256(src)
    assert meta["source_format"] == "caffe-v1"
    assert meta["classes"] == list(VOC_CLASSES)
    assert meta["preprocessing"]["mean_rgb"] == [123.68, 116.779, 103.939]
    assert meta["preprocessing"]["channel_order"] == "BGR"
    assert meta["width"] == WIDTH
    assert "paper" not in meta  # the paper's mIoU belongs to the full-width 21-class model only
    assert set(state_dict) == set(ours)  # in CrfRnnNet's layout
    for key, value in ours.items():
        assert torch.equal(state_dict[key], value)
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:  # readable by any safetensors tool
        assert json.loads(f.metadata()["crfasrnn"])["source_sha256"] == file_sha256(src)
    assert (dst.stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_paper_metadata_for_the_published_architecture():
    from crfasrnn.weights import default_metadata

    meta = default_metadata(21)
    assert meta["paper"]["miou"] == PAPER["miou"] == 74.7
    assert len(meta["classes"]) == 21


def test_load_model_builds_the_described_network(tmp_path, weights, ours, image):
    path = write_caffemodel(tmp_path / "a.caffemodel", weights, v1=False)
    model, info = load_model(path, num_iterations=2)
    assert model.width == WIDTH and model.num_classes == 21 and not model.training
    reference = _net()
    reference.load_state_dict(ours)
    assert torch.equal(_logits(model, image), _logits(reference, image))
    five = random_state_dict(5, width=1 / 32, seed=1)
    model, info = load_model(write_port_pth(tmp_path / "five.pth", five))
    assert isinstance(model, CrfRnnNet) and model.num_classes == 5 and model.backbone.conv1_1.weight.shape[0] == 2
    assert info.classes == tuple(f"class_{i}" for i in range(5))


def test_fcn_only_model_with_strict_false(tmp_path, weights, ours, image):
    path = write_port_pth(tmp_path / "port.pth", weights)
    fcn = FCN8s(21, width=WIDTH).eval()
    with pytest.raises(WeightsError, match=r"unexpected tensors: crf\.spatial_weights"):
        load_weights(fcn, path)
    info = load_weights(fcn, path, strict=False)
    assert set(info.unexpected_keys) == {"crf.spatial_weights", "crf.bilateral_weights", "crf.compatibility"}
    reference = _net()
    reference.load_state_dict(ours)
    assert torch.equal(_logits(fcn, image), reference.unary(image).detach())
    # and the other way: an FCN-8s file is a CrfRnnNet's backbone (its CRF kept)
    save_weights(fcn, tmp_path / "fcn.safetensors")
    net = _net()
    crf_before = {k: v.clone() for k, v in net.crf.state_dict().items()}
    with pytest.raises(WeightsError, match=r"missing tensors: crf\.spatial_weights"):
        load_weights(net, tmp_path / "fcn.safetensors")
    info = load_weights(net, tmp_path / "fcn.safetensors", strict=False)
    assert set(info.missing_keys) == {"crf.spatial_weights", "crf.bilateral_weights", "crf.compatibility"}
    assert all(torch.equal(v, crf_before[k]) for k, v in net.crf.state_dict().items())
    assert torch.equal(net.unary(image).detach(), _logits(fcn, image))


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval()


def test_load_model_reads_training_checkpoints_and_builds_the_network_they_hold(tmp_path, image):
    """A `crfasrnn train` checkpoint: CrfRnnNet with a CRF, FCN8s without; the width its options record."""
    crf = _randomised(CrfRnnNet(4, num_iterations=2, width=WIDTH))
    names = ["bg", "a", "b", "c"]
    torch.save({"model": crf.state_dict(), "args": {"width": WIDTH}, "class_names": names}, tmp_path / "crf.pt")
    model, info = load_model(tmp_path / "crf.pt", num_iterations=2)
    assert type(model) is CrfRnnNet and info.format == "checkpoint" and info.classes == tuple(names)
    assert torch.equal(_logits(model, image), _logits(crf, image))
    # stage fcn: only FCN-8s tensors; a width whose conv1_1 channels / 64 would build other fc6/fc7 sizes
    fcn = _randomised(FCN8s(3, width=0.1))
    assert fcn.conv1_1.weight.shape[0] / 64 != 0.1 and FCN8s(3, width=6 / 64).fc6.weight.shape != fcn.fc6.weight.shape
    torch.save({"model": fcn.state_dict(), "args": {"width": 0.1, "stage": "fcn"}}, tmp_path / "fcn.pt")
    model, info = load_model(tmp_path / "fcn.pt")
    assert type(model) is FCN8s and model.width == 0.1 and info.metadata["architecture"] == "FCN8s"
    assert torch.equal(_logits(model, image), _logits(fcn, image))
    # without the recorded width, conv1_1's channels give another network, and the error names the tensor
    torch.save({"model": fcn.state_dict(), "args": {}}, tmp_path / "fcn-no-width.pt")
    with pytest.raises(WeightsError, match=r"tensor 'conv2_1.weight' has shape \(13, 6, 3, 3\) but the model expects"):
        load_model(tmp_path / "fcn-no-width.pt")


def test_fcn_weights_in_our_format_build_an_fcn(tmp_path, image):
    fcn = _randomised(FCN8s(21, width=WIDTH))
    save_weights(fcn, tmp_path / "fcn.safetensors")
    model, info = load_model(tmp_path / "fcn.safetensors")
    assert type(model) is FCN8s and info.metadata["architecture"] == "FCN8s" and "paper" not in info.metadata
    assert torch.equal(_logits(model, image), _logits(fcn, image))
    converted = convert_weights(tmp_path / "fcn.safetensors", tmp_path / "fcn2.pt")
    assert converted.num_classes == 21 and type(load_model(tmp_path / "fcn2.pt")[0]) is FCN8s


def test_torchvision_vgg16_is_a_backbone_not_a_model(tmp_path):
    fcn = FCN8s(3, width=WIDTH).state_dict()
    vgg = {}
    for src, dst in VGG16_TORCHVISION_KEYS.items():
        vgg[f"{src}.weight"] = fcn[f"{dst}.weight"].flatten(1) if src.startswith("classifier") else fcn[f"{dst}.weight"]
        vgg[f"{src}.bias"] = fcn[f"{dst}.bias"]
    vgg["classifier.6.weight"], vgg["classifier.6.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(vgg, tmp_path / "vgg16.pth")
    with pytest.raises(WeightsError, match=r"'score_fr.weight' is missing; .*torchvision VGG-16 backbone"):
        load_model(tmp_path / "vgg16.pth")
    state_dict, info = read_weights(tmp_path / "vgg16.pth", allow_backbone=True)
    assert info.format == "torchvision-vgg16" and info.num_classes == 0 and info.metadata["width"] == WIDTH
    assert all(torch.equal(state_dict[k], v) for k, v in fcn.items() if k.split(".")[0] in ("conv1_1", "fc6", "fc7"))


# ------------------------------------------------------------------------------------------------ bad files


def _unchanged(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def _expect_error(net, path, match, *, exc=WeightsError):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(exc, match=match):
        load_weights(net, path)
    assert _unchanged(net, before)  # nothing loaded half-way


@pytest.mark.parametrize("v1", [True, False])
def test_truncated_caffemodel(tmp_path, weights, v1):
    data = write_caffemodel(tmp_path / "full.caffemodel", weights, v1=v1).read_bytes()
    net = _net()
    for fraction in (0.999, 0.7, 0.5, 0.2, 0.01):
        path = tmp_path / f"cut{fraction}.caffemodel"
        path.write_bytes(data[: int(len(data) * fraction)])
        _expect_error(net, path, "truncated|missing|no layers")


def test_not_protobuf(tmp_path):
    net = _net()
    text = tmp_path / "notes.caffemodel"
    text.write_text("this is not a model\n" * 50)
    _expect_error(net, text, "not a (readable )?Caffe model")
    jpeg = tmp_path / "photo.caffemodel"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20)
    _expect_error(net, jpeg, "not a (readable )?Caffe model")
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    _expect_error(net, empty, "empty")
    _expect_error(net, tmp_path / "absent.caffemodel", "not found", exc=FileNotFoundError)


def test_wrong_class_count(tmp_path):
    five = random_state_dict(5, width=WIDTH, seed=2)
    net = _net()
    for path in (write_caffemodel(tmp_path / "five.caffemodel", five), write_port_pth(tmp_path / "five.pth", five)):
        _expect_error(net, path, r"has 5 classes \(backbone\.score_fr\.weight \(5, 256, 1, 1\)\) but the model has 21")


def test_missing_and_unexpected_caffe_layers(tmp_path, weights):
    net = _net()
    _expect_error(
        net,
        write_caffemodel(tmp_path / "m.caffemodel", weights, skip_layer="score-pool3"),
        "Caffe layer 'score-pool3' is missing .*score_pool3.weight",
    )
    _expect_error(
        net,
        write_caffemodel(tmp_path / "u.caffemodel", weights, extra_layer="conv6_1"),
        "unexpected Caffe layers with weights: conv6_1",
    )


def test_blob_count_and_value_count_errors(tmp_path, weights):
    m = caffe_messages()
    net_msg = m.NetParameter.FromString(write_caffemodel(tmp_path / "a.caffemodel", weights).read_bytes())
    layer = next(lay for lay in net_msg.layers if lay.name == "score2")
    del layer.blobs[1]  # the bias of upscore2
    bad = tmp_path / "blobs.caffemodel"
    bad.write_bytes(net_msg.SerializeToString())
    _expect_error(_net(), bad, "layer 'score2' has 1 blobs, expected 2")
    net_msg = m.NetParameter.FromString(write_caffemodel(tmp_path / "b.caffemodel", weights).read_bytes())
    blob = next(lay for lay in net_msg.layers if lay.name == "fc7").blobs[0]
    del blob.data[-3:]
    bad = tmp_path / "values.caffemodel"
    bad.write_bytes(net_msg.SerializeToString())
    _expect_error(_net(), bad, r"layer 'fc7' blob 0: shape \(256, 256, 1, 1\) needs 65536 values but the blob has")


def test_wrong_width_names_the_tensor(tmp_path, weights):
    path = write_caffemodel(tmp_path / "a.caffemodel", weights)
    _expect_error(
        _net(width=1 / 32),
        path,
        r"tensor 'backbone\.conv1_1\.weight' has shape \(4, 3, 3, 3\) but the model "
        r"expects \(2, 3, 3, 3\)",
    )


def test_state_dict_errors_leave_the_model_unchanged(tmp_path, weights):
    net = _net()
    missing = dict(weights)
    del missing["fc7.bias"]
    _expect_error(net, write_port_pth(tmp_path / "missing.pth", missing), r"missing tensors: backbone\.fc7\.bias")
    extra = {**weights, "fc8.weight": torch.zeros(3)}
    _expect_error(net, write_port_pth(tmp_path / "extra.pth", extra), "unexpected tensors: fc8.weight")
    last_bad = {**weights, "upscore8.weight": torch.zeros(21, 21, 8, 8)}  # every other tensor fits
    _expect_error(net, write_port_pth(tmp_path / "shape.pth", last_bad), "'backbone.upscore8.weight' has shape")
    nan = {**weights, "fc6.bias": weights["fc6.bias"].clone()}
    nan["fc6.bias"][3] = float("nan")
    _expect_error(net, write_port_pth(tmp_path / "nan.pth", nan), "'backbone.fc6.bias' .* NaN")
    ints = {**weights, "fc6.bias": torch.zeros(256, dtype=torch.int64)}
    _expect_error(net, write_port_pth(tmp_path / "ints.pth", ints), "'fc6.bias' has dtype torch.int64")
    torch.save({"optimizer": 3}, tmp_path / "other.pt")
    _expect_error(net, tmp_path / "other.pt", "not a named tensor|no state_dict")


@pytest.mark.parametrize("name", ["port.pth", "ours.safetensors", "ours.pt"])
def test_truncated_torch_and_safetensors(tmp_path, weights, name):
    path = tmp_path / name
    if name == "port.pth":
        write_port_pth(path, weights)
    else:
        save_weights(weights, path)
    data = path.read_bytes()
    cut = tmp_path / f"cut-{name}"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(_net(), cut, "truncated")


def test_convert_validates_before_writing(tmp_path, weights):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(WeightsError, match="score-pool4"):
        convert_weights(write_caffemodel(tmp_path / "m.caffemodel", weights, skip_layer="score-pool4"), dst)
    assert not dst.exists() and not list(tmp_path.glob(".out*"))


def test_save_weights_is_atomic(tmp_path, weights, monkeypatch):
    import safetensors.torch

    dst = tmp_path / "w.safetensors"
    save_weights(weights, dst)
    before = dst.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(weights, dst)
    assert dst.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.slow
def test_full_size_caffemodel(tmp_path):
    """The published architecture's real shapes (134 M parameters, a 538 MB file), V1 layout, and the port's .pth."""
    weights = random_state_dict(21, width=1.0, seed=5)
    path = write_caffemodel(tmp_path / "TVG_CRFRNN_COCO_VOC.caffemodel", weights, v1=True, raw=True)
    assert path.stat().st_size > 530e6
    model, info = load_model(path)
    assert info.format == "caffe-v1" and model.width == 1.0 and info.metadata["paper"]["miou"] == 74.7
    for key, value in compose_keys(weights).items():
        assert torch.equal(model.state_dict()[key], value), key
    del model
    port = write_port_pth(tmp_path / "crfasrnn_weights.pth", weights)
    path.unlink()
    model, info = load_model(port)
    assert info.format == "port-pth"
    assert torch.equal(model.crf.compatibility, weights["crf.compatibility"])
