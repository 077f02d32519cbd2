"""Label maps in their formats (crfasrnn.image.read_annotation / save_annotation) and .npy probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crfasrnn.image import overlay, read_annotation, read_probabilities, save_annotation, voc_palette


def palette_png(path, values, palette):
    im = Image.fromarray(np.asarray(values, np.uint8), mode="P")
    im.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    im.save(path)


def test_voc_palette_png_is_read_as_indices_and_keeps_its_palette(tmp_path):
    values = np.array([[0, 1, 255], [15, 1, 0]])
    palette_png(tmp_path / "a.png", values, voc_palette())
    ann = read_annotation(tmp_path / "a.png")
    assert ann.kind == "index" and ann.unknown_label == 255
    np.testing.assert_array_equal(ann.labels, values)
    save_annotation(ann, np.array([[0, 1, 2], [15, 1, 0]]), tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), [[0, 1, 2], [15, 1, 0]])
        np.testing.assert_array_equal(np.asarray(im.getpalette()).reshape(-1, 3)[:256], voc_palette())


def test_grey_png_is_read_as_integers_and_written_back_grey(tmp_path):
    values = np.array([[0, 3, 7], [255, 2, 1]], np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "g.png")
    ann = read_annotation(tmp_path / "g.png", unknown_label=None)
    assert ann.kind == "index" and ann.unknown_label is None
    np.testing.assert_array_equal(ann.labels, values)
    save_annotation(ann, values.astype(np.int64), tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), values)


def test_rgb_annotation_one_class_per_colour_black_unknown(tmp_path):
    red, green, blue = (200, 0, 0), (0, 200, 0), (0, 0, 200)
    rgb = np.array([[red, green, (0, 0, 0)], [blue, red, green]], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    ann = read_annotation(tmp_path / "c.png")
    assert ann.kind == "color" and ann.num_classes == 3 and ann.unknown_label == -1
    # classes ordered by r + 256 g + 65536 b: red, green, blue
    np.testing.assert_array_equal(ann.labels, [[0, 1, -1], [2, 0, 1]])
    save_annotation(ann, np.array([[0, 1, 1], [2, 0, 1]]), tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im)[0, 2], green)  # the unknown pixel, now labelled, in its colour
        np.testing.assert_array_equal(np.asarray(im)[1], [blue, red, green])


def test_palette_with_other_colours_is_a_colour_annotation(tmp_path):
    """The classic dense-CRF annotations: palette PNGs whose black entry (here index 2) means unknown."""
    palette = [(64, 128, 0), (0, 64, 0), (0, 0, 0), (255, 255, 255)]
    palette_png(tmp_path / "p.png", [[0, 1, 2], [2, 1, 0]], palette)
    ann = read_annotation(tmp_path / "p.png")
    assert ann.kind == "color" and ann.num_classes == 2
    np.testing.assert_array_equal(ann.labels, [[1, 0, -1], [-1, 0, 1]])  # (0,64,0) packs lower than (64,128,0)
    save_annotation(ann, np.array([[1, 0, 0], [1, 0, 1]]), tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), [[0, 1, 1], [0, 1, 0]])  # the file's own palette indices
    # forcing the integer reading keeps the indices
    np.testing.assert_array_equal(read_annotation(tmp_path / "p.png", labels_as="index").labels, [[0, 1, 2], [2, 1, 0]])


def test_annotation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_annotation(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read label map"):
        read_annotation(tmp_path / "junk.png")
    photo = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="is it a photo"):
        read_annotation(tmp_path / "photo.png")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(ValueError, match="all black"):
        read_annotation(tmp_path / "black.png")
    with pytest.raises(ValueError, match="cannot be read as indices"):
        read_annotation(tmp_path / "black.png", labels_as="index")


def test_read_probabilities_layouts(tmp_path):
    chw = np.random.default_rng(0).random((3, 8, 12)).astype(np.float32)
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", chw.transpose(1, 2, 0))
    np.save(tmp_path / "low.npy", chw[:, ::2, ::2].transpose(1, 2, 0))  # (4, 6, 3): lower resolution, (H, W, C)
    np.testing.assert_array_equal(read_probabilities(tmp_path / "chw.npy", (8, 12)), chw)
    np.testing.assert_array_equal(read_probabilities(tmp_path / "hwc.npy", (8, 12)), chw)
    np.testing.assert_array_equal(read_probabilities(tmp_path / "low.npy", (8, 12)), chw[:, ::2, ::2])
    np.save(tmp_path / "bad.npy", chw[None])
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(H, W, C\)"):
        read_probabilities(tmp_path / "bad.npy", (8, 12))
    with pytest.raises(ValueError, match="fit neither"):
        read_probabilities(tmp_path / "chw.npy", (5, 5))
    np.save(tmp_path / "int.npy", np.ones((2, 8, 12), np.int64))
    with pytest.raises(ValueError, match="floating"):
        read_probabilities(tmp_path / "int.npy", (8, 12))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read probabilities"):
        read_probabilities(tmp_path / "junk.npy", (8, 12))


def test_overlay_blends():
    image = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(image, np.array([[0, 1], [1, 0]]), np.array([[0, 0, 0], [200, 100, 50]], np.uint8), alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [50, 50, 50])
    np.testing.assert_array_equal(out[0, 1], [150, 100, 75])
