"""Datasets: the VOC layout (plain, nested in VOCdevkit, SBD-augmented split), plain folders, checks, transforms."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from crfasrnn.data import (
    EvalTransform,
    FolderSegmentation,
    TrainTransform,
    VOCSegmentation,
    make_synthetic_voc,
    open_dataset,
    read_label_map,
)
from crfasrnn.data.transforms import MEAN_FILL_RGB
from crfasrnn.image import read_image, save_label_map


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("voc"), num_train=6, num_val=3, size=(30, 40), num_classes=4)


def test_synthetic_layout_and_determinism(voc, tmp_path):
    assert (voc / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:04d}" for i in range(6)]
    assert (voc / "classes.txt").read_text().split() == ["background", "red", "green", "blue"]
    again = make_synthetic_voc(tmp_path, num_train=6, num_val=3, size=(30, 40), num_classes=4)
    for stem in ("train_0000", "val_0002"):
        a = read_label_map(voc / "SegmentationClass" / f"{stem}.png")
        np.testing.assert_array_equal(a, read_label_map(again / "SegmentationClass" / f"{stem}.png"))
        np.testing.assert_array_equal(
            read_image(voc / "JPEGImages" / f"{stem}.jpg"), read_image(again / "JPEGImages" / f"{stem}.jpg")
        )
        assert a.shape == (30, 40) and set(np.unique(a)) <= {0, 1, 2, 3}
    labels = np.stack([read_label_map(p) for p in sorted((voc / "SegmentationClass").glob("*.png"))])
    assert set(np.unique(labels)) == {0, 1, 2, 3}  # every class occurs


def test_synthetic_boundary_band(tmp_path):
    root = make_synthetic_voc(tmp_path, num_train=2, num_val=1, size=(30, 40), boundary=1, seed=3)
    label = read_label_map(root / "SegmentationClass" / "train_0000.png")
    ignored = label == 255
    assert ignored.any()
    # every non-ignored pixel's 4-neighbours that are not ignored carry the same class: classes never touch
    for dy, dx in ((0, 1), (1, 0)):
        a, b = label[: label.shape[0] - dy, : label.shape[1] - dx], label[dy:, dx:]
        both = (a != 255) & (b != 255)
        assert (a[both] == b[both]).all()


def test_scribbles_label_every_region_with_a_stroke_never_whole():
    """Each connected region (two objects of one class, the background, a thin object) gets its own stroke inside
    it, a few percent of a wide region's pixels."""
    from crfasrnn.data.synthetic import scribble_labels

    label = np.zeros((30, 40), np.int64)
    label[3:13, 3:15] = 1  # two objects of class 1
    label[16:28, 22:37] = 1
    label[20:22, 2:12] = 2  # a thin one: 2 pixels high, nothing survives the margin
    s = scribble_labels(label, np.random.default_rng(0))
    for region in ((slice(3, 13), slice(3, 15)), (slice(16, 28), slice(22, 37))):
        assert (s[region] == 1).sum() >= 5 and (s[region] == 1).mean() < 0.4
    assert (s == 2).sum() >= 1
    assert ((s != 255) <= (s == label)).all()  # every scribbled pixel carries its true label
    assert (s == 0).sum() >= 5 and (s != 255).mean() < 0.15


def test_voc_dataset_samples(voc):
    ds = open_dataset(voc, "train")
    assert isinstance(ds, VOCSegmentation) and len(ds) == 6 and ds.num_classes == 4
    assert ds.class_names == ["background", "red", "green", "blue"]
    image, label = ds[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert label.dtype == torch.int64 and label.shape == (30, 40)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), read_image(voc / "JPEGImages/train_0002.jpg"))
    np.testing.assert_array_equal(label.numpy(), read_label_map(voc / "SegmentationClass/train_0002.png"))
    assert open_dataset(voc, "val", num_classes=4).ids == ["val_0000", "val_0001", "val_0002"]


def test_voc_nested_in_vocdevkit_and_sbd_split(voc, tmp_path):
    nested = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc, nested)
    (nested / "ImageSets/SegmentationAug").mkdir(parents=True)
    (nested / "SegmentationClassAug").mkdir()
    extra = np.full((30, 40), 2, np.int64)
    save_label_map(extra, nested / "SegmentationClassAug" / "train_0001.png")
    (nested / "ImageSets/SegmentationAug/train_aug.txt").write_text("train_0001\n")
    ds = open_dataset(tmp_path, "train_aug")
    assert ds.ids == ["train_0001"] and ds.class_names[1] == "red"
    np.testing.assert_array_equal(ds[0][1].numpy(), extra)  # labels from the augmented set
    assert len(open_dataset(tmp_path, "train")) == 6


def test_missing_split_and_files_are_clear_errors(voc, tmp_path):
    with pytest.raises(FileNotFoundError, match="no split list for split 'test'"):
        VOCSegmentation(voc, "test", num_classes=4)
    with pytest.raises(FileNotFoundError, match="no known dataset layout"):
        open_dataset(tmp_path, "train")
    copy = tmp_path / "copy"
    shutil.copytree(voc, copy)
    (copy / "SegmentationClass/train_0003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 files listed .* missing, e.g. .*train_0003.png"):
        open_dataset(copy, "train")


def test_folder_layout_matched_by_stem(tmp_path):
    images, masks = tmp_path / "train/images", tmp_path / "train/masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("b", "a"):
        Image.fromarray(rng.integers(0, 255, (8, 9, 3), dtype=np.uint8)).save(images / f"{stem}.png")
        save_label_map(rng.integers(0, 3, (8, 9)), masks / f"{stem}.png")
    save_label_map(np.zeros((8, 9)), masks / "orphan.png")  # skipped with a warning
    ds = open_dataset(tmp_path, "train", num_classes=3)
    assert isinstance(ds, FolderSegmentation) and ds.ids == ["a", "b"] and ds.class_names[2] == "class_2"
    np.testing.assert_array_equal(ds[1][1].numpy(), read_label_map(masks / "b.png"))
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(images / "c.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 images .* have no label map .* e.g. c"):
        open_dataset(tmp_path, "train", num_classes=3)


def test_bad_labels_are_errors(tmp_path):
    images, masks = tmp_path / "val/images", tmp_path / "val/masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(images / "x.png")
    save_label_map(np.array([[0, 1, 7, 255, 0]] * 4), masks / "x.png")
    ds = open_dataset(tmp_path, "val", num_classes=3)
    with pytest.raises(ValueError, match=r"label values \[7\] lie outside the class range 0..2"):
        ds[0]
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(masks / "x.png")  # an RGB "label map"
    with pytest.raises(ValueError, match="is a RGB image; expected a palette"):
        ds[0]
    save_label_map(np.zeros((4, 6)), masks / "x.png")
    with pytest.raises(ValueError, match=r"is 5x4 but its label map .* is 6x4"):
        ds[0]


def _find_window(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    h, w = small.shape[:2]
    return [
        (y, x)
        for y in range(big.shape[0] - h + 1)
        for x in range(big.shape[1] - w + 1)
        if np.array_equal(big[y : y + h, x : x + w], small)
    ]


def test_train_transform_crop_is_a_window_of_the_input():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (12, 15, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (12, 15))
    t = TrainTransform((6, 7), scale_range=(1, 1), hflip=False)
    for seed in range(5):
        out_image, out_label = t(image, label, np.random.default_rng(seed))
        assert out_image.shape == (6, 7, 3) and out_label.shape == (6, 7)
        (pos,) = _find_window(image, out_image)
        assert np.array_equal(label[pos[0] : pos[0] + 6, pos[1] : pos[1] + 7], out_label)


def test_train_transform_pads_with_mean_and_ignore_and_flips():
    image = np.full((4, 3, 3), 7, np.uint8)
    label = np.array([[0, 1, 2]] * 4)
    t = TrainTransform((6, 5), scale_range=(1, 1), hflip=True)
    flips = 0
    for seed in range(20):
        out_image, out_label = t(image, label, np.random.default_rng(seed))
        assert (out_label == 255).sum() == 30 - 12 and (out_image == 7).all(-1).sum() == 12
        assert ((out_image == MEAN_FILL_RGB).all(-1) == (out_label == 255)).all()
        row = out_label[(out_label != 255).any(1)][0]
        row = row[row != 255]
        assert row.tolist() in ([0, 1, 2], [2, 1, 0])
        flips += row.tolist() == [2, 1, 0]
    assert 0 < flips < 20


def test_train_transform_scales_labels_by_nearest_neighbour():
    label = np.kron(np.array([[0, 1], [2, 255]]), np.ones((10, 10), np.int64))
    image = np.zeros((20, 20, 3), np.uint8)
    t = TrainTransform(8, scale_range=(0.5, 0.5), hflip=False)
    expected = np.kron(np.array([[0, 1], [2, 255]]), np.ones((5, 5), np.int64))  # 20x20 scaled by 0.5
    for seed in range(3):
        _, out_label = t(image, label, np.random.default_rng(seed))
        assert out_label.shape == (8, 8) and len(_find_window(expected, out_label)) == 1
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(8, scale_range=(1.5, 0.5))


def test_dataset_randomness_depends_on_seed_epoch_index_only(voc):
    ds = open_dataset(voc, "train", transform=TrainTransform(24), seed=5)
    a = ds[3]
    assert all(torch.equal(x, y) for x, y in zip(a, ds[3]))
    ds.set_epoch(1)
    b = ds[3]
    assert not torch.equal(a[0], b[0])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    images, labels = next(iter(loader))
    assert torch.equal(images[1], ds[1][0]) and torch.equal(labels[0], ds[0][1])
    full = open_dataset(voc, "val", transform=EvalTransform())
    assert full[0][0].shape == (3, 30, 40)  # evaluation at full size


def test_scribbled_data_can_keep_the_full_labels_of_the_same_images(tmp_path):
    kept = make_synthetic_voc(tmp_path / "a", num_train=3, num_val=1, scribbles=True, keep_full_labels=True, seed=6)
    plain = make_synthetic_voc(tmp_path / "b", num_train=3, num_val=1, scribbles=True, seed=6)
    for stem in ("train_0000", "train_0002", "val_0000"):  # the same images and scribbles as without the option
        for sub, suffix in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            assert (kept / sub / f"{stem}.{suffix}").read_bytes() == (plain / sub / f"{stem}.{suffix}").read_bytes()
    for stem in ("train_0000", "train_0002"):
        full = np.asarray(Image.open(kept / "SegmentationClassFull" / f"{stem}.png"))
        scribbles = np.asarray(Image.open(kept / "SegmentationClass" / f"{stem}.png"))
        assert (full != 255).all() and (scribbles == 255).mean() > 0.8
        assert (scribbles[scribbles != 255] == full[scribbles != 255]).all()  # the scribbles are of these labels
    assert not (kept / "SegmentationClassFull" / "val_0000.png").exists()  # validation keeps its full labels anyway


def test_a_wider_scribble_margin_keeps_the_strokes_further_inside_the_same_images(tmp_path):
    from crfasrnn.data.synthetic import _components, _erode

    kw = {"num_train": 4, "num_val": 1, "size": (48, 64), "scribbles": True, "seed": 3}
    near = make_synthetic_voc(tmp_path / "a", keep_full_labels=True, **kw)
    far = make_synthetic_voc(tmp_path / "b", scribble_margin=5, **kw)
    checked = 0
    for stem in (f"train_{i:04d}" for i in range(4)):
        assert (near / "JPEGImages" / f"{stem}.jpg").read_bytes() == (far / "JPEGImages" / f"{stem}.jpg").read_bytes()
        full = np.asarray(Image.open(near / "SegmentationClassFull" / f"{stem}.png")).astype(np.int64)
        for margin, root in ((2, near), (5, far)):
            s = np.asarray(Image.open(root / "SegmentationClass" / f"{stem}.png")).astype(np.int64)
            assert (s[s != 255] == full[s != 255]).all()  # strokes carry their true labels
            for cls in np.unique(full):
                for region in _components(full == cls):
                    inner = _erode(region, margin)
                    stroke = region & (s == cls)
                    assert stroke.any()  # every region is scribbled
                    if inner.any():  # within the margin where the region is wide enough
                        assert not (stroke & ~inner).any(), (stem, margin, cls)
                        checked += margin == 5
    assert checked >= 4
    with pytest.raises(ValueError, match="scribble_margin"):
        make_synthetic_voc(tmp_path / "c", num_train=1, num_val=1, scribbles=True, scribble_margin=-1)
    assert not (tmp_path / "c").exists()
