"""Bad input to the command line gets one clear error line and exit status 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_weights import random_state_dict

from crfasrnn.weights import load_model, save_weights

DATA = Path(__file__).resolve().parents[1] / "src" / "crfasrnn" / "data"


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "crfasrnn", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("crfasrnn "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.fixture
def scene(tmp_path):
    photo, labels = tmp_path / "photo.png", tmp_path / "coarse.png"
    Image.open(DATA / "astronaut.jpg").convert("RGB").resize((40, 30)).save(photo)
    Image.open(DATA / "astronaut_coarse.png").resize((40, 30), Image.NEAREST).save(labels)
    return photo, labels


def test_a_decompression_bomb_is_refused(tmp_path, scene):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 megapixels of zeros: a few hundred kilobytes on disk
    assert bomb.stat().st_size < 2_000_000
    _, labels = scene
    _assert_one_line_error(
        _cli("refine", bomb, "--labels", labels, "-o", tmp_path / "o.png", "--max-pixels", "0"), "decompression bomb"
    )
    _assert_one_line_error(_cli("refine", scene[0], "--labels", bomb, "-o", tmp_path / "o.png"), "bomb.png")
    assert not (tmp_path / "o.png").exists()


def test_the_pixel_limit_is_read_from_the_header_and_can_be_changed(tmp_path, scene):
    photo, labels = scene
    big = tmp_path / "big.png"
    Image.new("1", (5000, 4000)).save(big)
    _assert_one_line_error(
        _cli("refine", big, "--labels", labels, "-o", tmp_path / "o.png"),
        "5000x4000 (20,000,000 pixels), more than the limit of 16,777,216",
    )
    _assert_one_line_error(
        _cli("refine", photo, "--labels", labels, "-o", tmp_path / "o.png", "--max-pixels", "1000"),
        "40x30 (1,200 pixels)",
    )
    proc = _cli("refine", photo, "--labels", labels, "-o", tmp_path / "o.png", "--max-pixels", "1200")
    assert proc.returncode == 0, proc.stderr


def test_serve_refuses_an_infinite_upload_limit():
    _assert_one_line_error(_cli("serve", "--max-upload-mb", "inf", "--port", "1"), "--max-upload-mb must be a finite")


def test_probabilities_big_endian_are_read_and_a_png_is_named(tmp_path, scene):
    photo, labels = scene
    probs = np.random.RandomState(0).dirichlet(np.ones(3), size=(30, 40)).transpose(2, 0, 1)
    np.save(tmp_path / "big_endian.npy", probs.astype(">f4"))
    np.save(tmp_path / "native.npy", probs.astype("<f4"))
    outputs = []
    for name in ("big_endian", "native"):
        out = tmp_path / f"{name}.png"
        proc = _cli("refine", photo, "--probs", tmp_path / f"{name}.npy", "-o", out)
        assert proc.returncode == 0, proc.stderr
        outputs.append(np.array(Image.open(out)))
    assert np.array_equal(*outputs)
    _assert_one_line_error(
        _cli("refine", photo, "--probs", labels, "-o", tmp_path / "x.png"), "not a .npy array file (it is a PNG image)"
    )


def test_weights_metadata_errors_name_the_file(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_weights(random_state_dict(21, width=1 / 16, seed=0), path, metadata={"width": "abc"})
    with pytest.raises(ValueError, match=r"odd\.safetensors: the metadata's width must be a number, got 'abc'"):
        load_model(path)


def test_evaluate_checks_its_json_target_before_the_work(tmp_path):
    preds, truth = tmp_path / "preds", tmp_path / "truth"
    preds.mkdir()
    truth.mkdir()
    proc = _cli("evaluate", "--predictions", preds, "--data", truth, "--json", tmp_path)
    _assert_one_line_error(proc, "must end in .json")
