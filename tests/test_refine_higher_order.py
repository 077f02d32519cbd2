"""`refine` and `crfasrnn refine` with the higher-order potentials: --detections FILE.json and --superpixels N,..."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from crfasrnn import refine
from crfasrnn.cli import main
from crfasrnn.data import make_synthetic_voc
from crfasrnn.higher_order import Detections, slic_superpixels


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_synthetic_voc(
        tmp_path_factory.mktemp("ho"), num_train=0, num_val=6, size=(60, 80), num_classes=4, max_objects=2, seed=0
    )
    out = []
    for i in range(6):
        image = np.asarray(Image.open(root / "JPEGImages" / f"val_{i:04d}.jpg").convert("RGB"))
        label = np.asarray(Image.open(root / "SegmentationClass" / f"val_{i:04d}.png")).astype(np.int64)
        out.append((root / "JPEGImages" / f"val_{i:04d}.jpg", image, label))
    return out


def _half_missed(label):
    """The label map with the right half of its first object given to the background, and that object's box."""
    cls = int(next(c for c in np.unique(label) if c != 0))
    mask = label == cls
    ys, xs = np.nonzero(mask)
    missed = np.where(mask & (np.arange(label.shape[1])[None] > np.median(xs)), 0, label)
    return missed, cls, mask, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _iou(pred, mask, cls):
    return ((pred == cls) & mask).sum() / ((pred == cls) | mask).sum()


def test_refine_with_a_detection_recovers_the_missed_half(photos):
    # measured: the object's IoU 0.0-0.98 without the detection, 0.77-1.0 with it (6 images); mean gain 0.37
    gains = []
    for _, image, label in photos:
        missed, cls, mask, box = _half_missed(label)
        dets = Detections.from_boxes([[box]], [[cls]], [[0.9]], size=label.shape)
        plain = refine(image, labels=missed, num_classes=4)
        with_detection = refine(image, labels=missed, num_classes=4, detections=dets)
        gains.append(_iou(with_detection, mask, cls) - _iou(plain, mask, cls))
    assert np.mean(gains) > 0.2 and min(gains) >= 0, gains


def test_refine_with_a_heavy_superpixel_weight_labels_each_segment_as_one(photos):
    """With one scale and a weight that dominates, a pixel's score is the segment's mean: one label per segment."""
    pytest.importorskip("skimage")
    _, image, label = photos[0]
    superpixels = slic_superpixels(image, 60)
    refined = refine(image, labels=label, num_classes=4, superpixels=superpixels, superpixel_weight=200.0)
    segments = superpixels.segments[0, 0].numpy()
    assert all(len(np.unique(refined[segments == s])) == 1 for s in np.unique(segments))
    plain = refine(image, labels=label, num_classes=4)
    assert not all(len(np.unique(plain[segments == s])) == 1 for s in np.unique(segments))  # not so without


def test_cli_refine_with_detections_and_superpixels(photos, tmp_path, capsys):
    pytest.importorskip("skimage")
    path, _, label = photos[1]
    missed, cls, mask, box = _half_missed(label)
    Image.fromarray(missed.astype(np.uint8)).save(tmp_path / "coarse.png")
    (tmp_path / "dets.json").write_text(json.dumps([{"label": cls, "score": 0.9, "box": box}]))
    out = tmp_path / "out.png"
    args = ["refine", str(path), "--labels", str(tmp_path / "coarse.png"), "--num-classes", "4", "-o", str(out)]
    assert main([*args, "--detections", str(tmp_path / "dets.json"), "--superpixels", "50,100"]) == 0
    refined = np.asarray(Image.open(out)).astype(np.int64)
    assert _iou(refined, mask, cls) > 0.7
    assert "wrote" in capsys.readouterr().out


def test_cli_detections_folder_per_image(photos, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    dets = tmp_path / "dets"
    dets.mkdir()
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    for path, image, label in photos[:2]:
        Image.fromarray(image).save(folder / f"{path.stem}.png")
        missed = _half_missed(label)[0]
        Image.fromarray(missed.astype(np.uint8)).save(coarse / f"{path.stem}.png")
    _, cls, _, box = _half_missed(photos[0][2])
    (dets / f"{photos[0][0].stem}.json").write_text(json.dumps([{"label": cls, "score": 0.9, "box": box}]))
    # the second image has no file: no detections
    out = tmp_path / "out"
    args = ["refine", str(folder), "--labels", str(coarse), "-o", str(out), "--num-classes", "4"]
    assert main([*args, "--detections", str(dets)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p, _, _ in photos[:2])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--detections", "missing.json"], "does not exist"),
        (["--detections", "BAD"], "not valid JSON"),
        (["--detections", "BEYOND"], "beyond the 4 classes"),
    ],
)
def test_cli_bad_detections_get_one_line_and_write_nothing(photos, tmp_path, capsys, extra, message):
    path, _, label = photos[0]
    Image.fromarray(label.astype(np.uint8)).save(tmp_path / "coarse.png")
    (tmp_path / "BAD").write_text("{not json")
    (tmp_path / "BEYOND").write_text(json.dumps([{"label": 7, "score": 0.5, "box": [0, 0, 4, 4]}]))
    extra = [e if e.startswith("--") else str(tmp_path / e) for e in extra]
    out = tmp_path / "out.png"
    args = ["refine", str(path), "--labels", str(tmp_path / "coarse.png"), "--num-classes", "4", "-o", str(out)]
    assert main([*args, *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "a,b", "10,-2"])
def test_cli_bad_superpixel_counts_are_refused(photos, tmp_path, capsys, value):
    path = photos[0][0]
    with pytest.raises(SystemExit) as exit_info:
        main(["refine", str(path), "--labels", str(path), "--superpixels", value])
    assert exit_info.value.code == 2
    assert "superpixel counts" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--superpixel-weight", "--detection-weight"])
def test_cli_non_finite_potential_weights_are_refused_before_reading_inputs(tmp_path, capsys, flag):
    out = tmp_path / "out.png"
    args = ["refine", str(tmp_path / "missing.png"), "--labels", str(tmp_path / "missing_too.png"), "-o", str(out)]
    assert main([*args, flag, "nan"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag[2:].replace('-', '_')} must be a finite number" in err[0], err
    assert not out.exists()
