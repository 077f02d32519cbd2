"""The demonstration (`make demo`) and the command line around it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crfasrnn.cli import main
from crfasrnn.demo import DEMO_CLASSES, run_demo
from crfasrnn.image import (
    bundled_annotation_path,
    bundled_photo_path,
    read_annotation,
    read_image,
    save_label_map,
    voc_palette,
)


def test_voc_palette_is_the_standard_colormap():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    expected = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        15: (192, 128, 128),
        20: (0, 64, 128),
    }
    for label, colour in expected.items():
        assert tuple(palette[label]) == colour


def test_label_map_round_trip(tmp_path):
    labels = np.random.RandomState(0).randint(0, 21, size=(7, 9))
    save_label_map(labels, tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["l.png"]  # no temporary left behind
    with pytest.raises(ValueError, match=r"0\.\.255"):
        save_label_map(np.full((2, 2), 300), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "junk.png")


def test_bundled_annotation_is_coarse_with_unknown_bands():
    ann = read_annotation(bundled_annotation_path())
    assert ann.kind == "index" and ann.unknown_label == 255
    assert ann.labels.shape == read_image(bundled_photo_path()).shape[:2]
    assert set(np.unique(ann.labels)) == set(range(len(DEMO_CLASSES))) | {255}
    assert 0.05 < (ann.labels == 255).mean() < 0.3
    assert bundled_annotation_path().stat().st_size < 10_000


def test_demo_refines_to_image_edges(tmp_path):
    result = run_demo(tmp_path, num_iterations=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.png", "output.png", "overlay.png"]
    with Image.open(tmp_path / "output.png") as im:
        assert im.mode == "P"
        refined = np.asarray(im)
    coarse = read_annotation(bundled_annotation_path()).labels
    assert refined.shape == coarse.shape == (500, 500)
    assert set(np.unique(refined)) <= set(range(len(DEMO_CLASSES)))  # every pixel labelled, unknown ones too
    assert result.unknown_pixels == (coarse == 255).sum() and result.labelled_pixels + result.unknown_pixels == 250_000
    # the CRF moves boundaries: a real share of labelled pixels changes label, but most keep theirs
    assert 0.02 < result.changed_pixels / result.labelled_pixels < 0.3
    # refined boundaries follow the photo: where the label changes, the colour changes much more than on average in
    # the unknown bands the boundaries were to be placed in (measured: 86 against 22, in 0..765 units)
    photo = read_image(bundled_photo_path()).astype(float)
    edge = np.abs(np.diff(photo, axis=1)).sum(axis=2)
    band = (coarse[:, 1:] == 255) | (coarse[:, :-1] == 255)
    assert edge[np.diff(refined, axis=1) != 0].mean() > 2.5 * edge[band].mean()
    comparison = read_image(tmp_path / "comparison.png")
    assert comparison.shape[1] == 3 * 500 + 2 * 8 and comparison.shape[0] > 500  # three panels, titles and legend


def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("output.png", "overlay.png", "comparison.png"))
    assert "changed the label of" in out and "unknown pixels" in out


def test_cli_error_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "-o", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("crfasrnn demo: error:") and "\n" not in err
