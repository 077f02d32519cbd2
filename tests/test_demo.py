"""The demonstration (`make demo`) and the command line around it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crfasrnn.cli import main
from crfasrnn.demo import coarse_block_labels, run_demo
from crfasrnn.image import read_image, save_label_map, voc_palette


def test_voc_palette_is_the_standard_colormap():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 15: (192, 128, 128),
                20: (0, 64, 128)}
    for label, colour in expected.items():
        assert tuple(palette[label]) == colour


def test_label_map_round_trip(tmp_path):
    labels = np.random.RandomState(0).randint(0, 21, size=(7, 9))
    save_label_map(labels, tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["l.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="0..255"):
        save_label_map(np.full((2, 2), 300), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "junk.png")


def test_coarse_labels_are_blocky():
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    image[:, 25:] = 200
    labels = coarse_block_labels(image, block=8, num_clusters=2)
    assert labels.shape == (40, 50)
    assert len(np.unique(labels)) == 2
    assert (labels[:, :3] != labels[:, -3:]).all()


def test_demo_refines_to_image_edges(tmp_path):
    result = run_demo(tmp_path, num_iterations=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coarse.png", "comparison.png", "output.png"]
    refined = np.asarray(Image.open(tmp_path / "output.png"))
    coarse = np.asarray(Image.open(tmp_path / "coarse.png"))
    assert refined.shape == coarse.shape == (500, 500)
    # the CRF moves boundaries: a real share of pixels changes label, but most keep their coarse label
    assert 0.02 < result.changed_pixels / result.total_pixels < 0.5
    # refined boundaries follow the photo: label changes line up with stronger colour edges than the block grid does
    photo = read_image(tmp_path / "comparison.png")[:, :500].astype(float)  # the first panel is the photo
    edge = np.abs(np.diff(photo, axis=1)).sum(axis=2)
    assert edge[np.diff(refined, axis=1) != 0].mean() > 1.5 * edge[np.diff(coarse, axis=1) != 0].mean()


def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    assert "output.png" in out and "changed the label of" in out


def test_cli_error_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "-o", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("crfasrnn demo: error:") and "\n" not in err
