"""Pre/postprocessing, the segmentation pipeline, `crfasrnn segment` / `crfasrnn convert`, and bad inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import UNREACHABLE
from PIL import Image
from synthetic_weights import random_state_dict, write_caffemodel, write_port_pth

from crfasrnn import VOC_CLASSES
from crfasrnn.cli import main
from crfasrnn.distributed import shard
from crfasrnn.image import overlay_labels, read_photo, voc_palette
from crfasrnn.inputs import expand_inputs, output_names
from crfasrnn.segment import class_shares, segment_image
from crfasrnn.transforms import pad_to, postprocess, prepare, preprocess, resize_longest_side
from crfasrnn.weights import file_sha256, save_weights

# ------------------------------------------------------------------------------------------------ transforms


def test_resize_longest_side():
    assert resize_longest_side(np.zeros((319, 500, 3), np.uint8)).shape == (319, 500, 3)
    assert resize_longest_side(np.zeros((1000, 750, 3), np.uint8)).shape == (500, 375, 3)
    assert resize_longest_side(np.zeros((333, 1000, 3), np.uint8)).shape == (166, 500, 3)  # int(333 * 0.5)
    small = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert resize_longest_side(small) is small  # no upscaling unless asked
    assert resize_longest_side(small, 6, upscale=True).shape == (4, 6, 3)
    flat = np.full((10, 20, 3), 77, np.uint8)
    assert np.all(resize_longest_side(flat, 8) == 77)  # bilinear keeps a constant image
    with pytest.raises(ValueError, match="max_size"):
        resize_longest_side(flat, 0)
    with pytest.raises(TypeError, match="uint8"):
        resize_longest_side(flat.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        preprocess(np.zeros((4, 4), np.uint8))


def test_preprocess_is_mean_subtracted_bgr():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = preprocess(img)
    assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
    for c_out, c_in, mean in ((0, 2, 103.939), (1, 1, 116.779), (2, 0, 123.68)):
        assert torch.allclose(x[c_out], torch.from_numpy(img[:, :, c_in].astype(np.float32) - np.float32(mean)))


def test_prepare_and_postprocess_round_trip():
    p = prepare(np.zeros((90, 120, 3), np.uint8), max_size=50)
    assert p.tensor.shape == (3, 50, 50) and p.resized_size == (37, 50) and p.original_size == (90, 120)
    assert torch.count_nonzero(p.tensor[:, 37:]) == 0  # zero padding at the bottom
    assert tuple(prepare(np.zeros((10, 20, 3), np.uint8), max_size=50, pad=False).tensor.shape) == (3, 10, 20)
    assert pad_to(torch.ones(2, 60, 70), 50, 50).shape == (2, 60, 70)  # never crops
    # postprocess: labels of a 2×3 resized picture (inside 4×4 padding) back to 4×6, nearest neighbour
    logits = torch.zeros(3, 4, 4)
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])
    logits.scatter_(0, torch.nn.functional.pad(labels, (0, 1, 0, 2))[None], 1.0)
    logits[:, 2:, :] = 0
    logits[1, 2:, :] = 5  # the padding predicts class 1: must be cropped away
    out = postprocess(logits, (2, 3), (4, 6))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [2, 2, 1, 1, 0, 0], [2, 2, 1, 1, 0, 0]]


class _BlueDetector(torch.nn.Module):
    """A stand-in network: class 1 where the input's first channel (B after the flip, mean removed) is positive."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), x[:, 0]], dim=1)


def test_segment_image_pipeline_geometry_and_channel_order():
    photo = np.zeros((90, 120, 3), np.uint8)
    photo[:, :60] = (255, 0, 0)  # red left half
    photo[:, 60:] = (0, 0, 255)  # blue right half
    labels = segment_image(_BlueDetector(), photo, max_size=50)
    assert labels.shape == (90, 120) and labels.dtype == np.uint8
    assert np.all(labels[:, :55] == 0) and np.all(labels[:, 66:] == 1)  # BGR order, crop, resize back
    tall = np.zeros((30, 10, 3), np.uint8)
    tall[20:] = (0, 0, 200)
    labels = segment_image(_BlueDetector(), tall, max_size=50)  # smaller than max_size: not upscaled, padded
    assert labels.shape == (30, 10) and np.all(labels[:19] == 0) and np.all(labels[21:] == 1)


def test_class_shares_and_overlay():
    labels = np.zeros((10, 10), np.uint8)
    labels[:5, :4] = 15
    labels[9, 9] = 255
    shares = class_shares(labels, VOC_CLASSES)
    assert shares[0] == (0, "background", 0.79) and shares[1] == (15, "person", 0.2)
    assert sum(s for _, _, s in shares) == pytest.approx(1.0)
    photo = np.full((10, 10, 3), 100, np.uint8)
    out = overlay_labels(photo, labels, VOC_CLASSES, alpha=0.5)
    assert out.shape[1] == 10 and out.shape[0] > 10  # legend below
    assert out[0, 0].tolist() == [146, 114, 114]  # 0.5·100 + 0.5·(192, 128, 128)
    assert out[9, 0].tolist() == [100, 100, 100] and out[9, 9].tolist() == [100, 100, 100]  # background, ignore
    assert voc_palette()[15].tolist() == [192, 128, 128]


def test_expand_inputs_and_shard(tmp_path):
    for name in ("b.jpg", "a.png", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    found = expand_inputs([tmp_path])
    assert [p.name for p in found] == ["a.png", "b.jpg"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.jpg"), tmp_path / "b.jpg"])] == ["b.jpg"]
    with pytest.raises(ValueError, match="no images"):
        expand_inputs([tmp_path / "sub"])
    with pytest.raises(ValueError, match="no files match"):
        expand_inputs([str(tmp_path / "*.gif")])
    items = list(range(11))
    parts = [shard(items, r, 4) for r in range(4)]
    assert sorted(item for part in parts for item in part) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert output_names([tmp_path / "x.jpg", tmp_path / "sub" / "x.jpg", tmp_path / "x_2.png"]) == ["x", "x_3", "x_2"]


# ------------------------------------------------------------------------------------------------ reading photos


def _photo(seed: int = 0, size=(40, 56)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def test_read_photo_modes(tmp_path):
    rgb = _photo()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_photo(tmp_path / "rgb.png"), rgb)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_photo(tmp_path / "rgba.png"), rgb)  # alpha dropped, as the reference does
    gray = rgb[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert np.array_equal(read_photo(tmp_path / "gray.png"), np.repeat(gray[:, :, None], 3, axis=2))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    with pytest.raises(ValueError, match="not an 8-bit image"):
        read_photo(tmp_path / "deep.png")
    data = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cannot read image"):
        read_photo(tmp_path / "cut.png")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ValueError, match="cannot read image"):
        read_photo(tmp_path / "text.jpg")
    with pytest.raises(FileNotFoundError):
        read_photo(tmp_path / "absent.jpg")


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(random_state_dict(21, width=1 / 16, seed=7), path)
    return path


FAST = ["--max-size", "48", "--iterations", "2", "-q"]


def _run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_segment_without_weights_fetches_the_default_and_says_why_it_cannot(tmp_path, capsys, monkeypatch):
    """No --weights: the published default (voc-coco) is fetched; offline, one line names the URL, the cache file and
    how to pass a local file, and nothing is created."""
    monkeypatch.delenv("CRFASRNN_WEIGHTS", raising=False)
    Image.fromarray(_photo()).save(tmp_path / "a.jpg")
    rc, out, err = _run(["segment", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out")], capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("crfasrnn segment: error: cannot reach "), err
    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    for needle in (f"{UNREACHABLE}/crfasrnn_weights.pth", str(cache / "crfasrnn_weights.pth"), "--weights PATH"):
        assert needle in err
    assert not (tmp_path / "out").exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_segment_writes_label_maps_and_overlays(tmp_path, capsys, monkeypatch, weights_file):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(1, (40, 56))).save(photos / "one.jpg", quality=95)
    Image.fromarray(_photo(2, (70, 30))).save(photos / "two.png")
    monkeypatch.setenv("CRFASRNN_WEIGHTS", str(weights_file))  # the environment variable instead of --weights
    out_dir = tmp_path / "out"
    rc, out, err = _run(["segment", str(photos), "-o", str(out_dir), "--overlay", *FAST], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["one.png", "one_overlay.png", "two.png", "two_overlay.png"]
    for name, size in (("one", (56, 40)), ("two", (30, 70))):
        label_png = Image.open(out_dir / f"{name}.png")
        assert label_png.mode == "P" and label_png.size == size
        assert label_png.getpalette()[: 3 * 21] == voc_palette(21).reshape(-1).tolist()
        labels = np.asarray(label_png)
        # the printed shares are those of the written label map
        line = next(ln for ln in out.splitlines() if f"{name}." in ln)
        for _label, cls, share in class_shares(labels, VOC_CLASSES):
            assert f"{cls} {100 * share:.1f}%" in line
        overlay = Image.open(out_dir / f"{name}_overlay.png")
        assert overlay.size[0] == size[0] and overlay.size[1] > size[1]
    # the same as the library call
    from crfasrnn.weights import load_model

    model, _ = load_model(weights_file, num_iterations=2)
    expected = segment_image(model, read_photo(photos / "two.png"), max_size=48)
    assert np.array_equal(np.asarray(Image.open(out_dir / "two.png")), expected)


def test_segment_grayscale_and_rgba_like_their_rgb(tmp_path, capsys, weights_file):
    rgb = _photo(3, (36, 48))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, np.zeros((36, 48, 1), np.uint8)], 2), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 1], "L").save(tmp_path / "gray.png")
    Image.fromarray(np.repeat(rgb[:, :, 1:2], 3, 2)).save(tmp_path / "gray3.png")
    out_dir = tmp_path / "out"
    rc, _out, err = _run(
        ["segment", str(tmp_path / "*.png"), "-w", str(weights_file), "-o", str(out_dir), *FAST], capsys
    )
    assert rc == 0, err
    read = lambda n: np.asarray(Image.open(out_dir / f"{n}.png"))  # noqa: E731
    assert np.array_equal(read("rgba"), read("rgb"))
    assert np.array_equal(read("gray"), read("gray3"))


def test_segment_bad_images_are_reported_and_skipped(tmp_path, capsys, weights_file):
    good = _photo(4)
    Image.fromarray(good).save(tmp_path / "good.png")
    Image.fromarray(good[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "corrupt.png").write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    args = [
        "segment",
        str(tmp_path / "deep.png"),
        str(tmp_path / "corrupt.png"),
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "good.png"),
        "-w",
        str(weights_file),
        "-o",
        str(out_dir),
        *FAST,
    ]
    rc, _out, err = _run(args, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(ln.startswith("crfasrnn segment: error: ") for ln in lines)
    assert "deep.png" in lines[0] and "8-bit" in lines[0]
    assert "corrupt.png" in lines[1] and "missing.jpg" in lines[2]
    assert "3 of 4 images" in lines[3]
    assert "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["good.png"]  # nothing partial, the good one done


def test_segment_unwritable_output(tmp_path, capsys, weights_file, monkeypatch):
    Image.fromarray(_photo()).save(tmp_path / "a.png")
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    rc, _out, err = _run(
        ["segment", str(tmp_path / "a.png"), "-w", str(weights_file), "-o", str(blocker / "out"), *FAST], capsys
    )
    assert rc == 1 and err.startswith("crfasrnn segment: error: output folder") and "not writable" in err
    assert err.count("\n") == 1
    # a folder that refuses the write half-way (e.g. permissions, disk full): no partial or temporary file is left
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    rc, _out, err = _run(
        ["segment", str(tmp_path / "a.png"), "-w", str(weights_file), "-o", str(out_dir), "--overlay", *FAST], capsys
    )
    assert rc == 1 and "Permission denied" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_segment_under_torchrun_takes_a_share(tmp_path, capsys, weights_file, monkeypatch):
    for i in range(5):
        Image.fromarray(_photo(i, (20, 24))).save(tmp_path / f"p{i}.png")
    written = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        out_dir = tmp_path / f"out{rank}"
        rc, _out, err = _run(["segment", str(tmp_path), "-w", str(weights_file), "-o", str(out_dir), *FAST], capsys)
        assert rc == 0, err
        written.append(sorted(p.name for p in out_dir.iterdir()))
    assert written == [["p0.png", "p2.png", "p4.png"], ["p1.png", "p3.png"]]


def test_convert_cli(tmp_path, capsys):
    weights = random_state_dict(21, width=1 / 16, seed=8)
    for src in (write_caffemodel(tmp_path / "TVG.caffemodel", weights), write_port_pth(tmp_path / "port.pth", weights)):
        dst = tmp_path / f"{src.stem}.safetensors"
        rc, out, err = _run(["convert", str(src), str(dst)], capsys)
        assert rc == 0, err
        assert f"sha256 {file_sha256(dst)}" in out and file_sha256(src) in out
    # the two conversions hold the same tensors
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "TVG.safetensors"), load_file(tmp_path / "port.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes((tmp_path / "TVG.caffemodel").read_bytes()[:1000])
    rc, out, err = _run(["convert", str(cut), str(tmp_path / "cut.safetensors")], capsys)
    assert rc == 1 and err.startswith("crfasrnn convert: error: ") and err.count("\n") == 1
    assert not (tmp_path / "cut.safetensors").exists()
