"""Samples with detections and superpixels: masks that follow the transform, the generator's detections, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crfasrnn.data import EvalTransform, TrainTransform, make_synthetic_voc, open_dataset
from crfasrnn.data.higher_order import HigherOrderDataset, collate_higher_order
from crfasrnn.higher_order import read_detections

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(
        tmp_path_factory.mktemp("ho"), num_train=6, num_val=2, detections=True, false_detections=0.5, seed=3
    )


@pytest.mark.parametrize("seed", range(8))
def test_masks_follow_the_label_through_scale_pad_crop_and_flip(seed):
    rng = np.random.default_rng(100 + seed)
    label = rng.integers(0, 3, size=(30, 37))
    masks = np.stack([label == k for k in range(3)])
    transform = TrainTransform((40, 24), scale_range=(0.6, 1.4), pad_label=254)
    image = rng.integers(0, 256, size=(30, 37, 3), dtype=np.uint8)
    out_image, out_label, out_masks = transform.with_masks(image, label, masks, np.random.default_rng(seed))
    pair = transform(image, label, np.random.default_rng(seed))
    np.testing.assert_array_equal(out_image, pair[0])  # the same random draws as without masks
    np.testing.assert_array_equal(out_label, pair[1])
    assert out_masks is not None and out_masks.shape == (3, 40, 24) and out_masks.dtype == bool
    for k in range(3):
        np.testing.assert_array_equal(out_masks[k], out_label == k)  # padding (254) is in no mask
    empty = transform.with_masks(image, label, masks[:0], np.random.default_rng(seed))[2]
    assert empty is not None and empty.shape == (0, 40, 24)


def test_the_generator_detects_every_object_without_changing_the_images(voc, tmp_path):
    plain = make_synthetic_voc(tmp_path, num_train=6, num_val=2, seed=3)
    for stem in ("train_0000", "train_0005", "val_0001"):
        assert (voc / "JPEGImages" / f"{stem}.jpg").read_bytes() == (plain / "JPEGImages" / f"{stem}.jpg").read_bytes()
    dataset = open_dataset(voc, "train")
    false = 0
    for index, stem in enumerate(dataset.ids):
        _, label = dataset.load(index)
        entries = json.loads((voc / "Detections" / f"{stem}.json").read_text())
        found = read_detections(voc / "Detections" / f"{stem}.json", label.shape, dataset.num_classes)
        covered = np.zeros(label.shape, bool)
        for entry, mask in zip(entries, found.masks[0].numpy()):
            if entry["score"] < 0.5:  # a false detection (scores 0.3..0.5): on the background
                assert (label[mask] != 0).mean() <= 0.1
                false += 1
                continue
            assert entry["score"] <= 1
            covered |= mask & (label == entry["label"])
        # every object pixel lies in a detection of its class: the boxes bound the visible objects
        np.testing.assert_array_equal(covered, label > 0)
    assert 0 < false < len(dataset)  # about half the images have one


def test_samples_carry_transformed_detections_and_superpixels(voc):
    base = open_dataset(voc, "train", transform=TrainTransform(32, scale_range=(0.8, 1.2)), seed=5)
    dataset = HigherOrderDataset(base, detections=voc / "Detections", superpixels=(10, 30))
    base.set_epoch(2)
    for index in range(len(dataset)):
        image, label, detections, segments = dataset[index]
        plain_image, plain_label = base[index]
        torch.testing.assert_close(image, plain_image)  # the pair as without the inputs
        torch.testing.assert_close(label, plain_label)
        raw_image, raw_label = base.load(index)
        full = read_detections(voc / "Detections" / f"{base.ids[index]}.json", raw_label.shape, 4)
        expected = base.transform.with_masks(raw_image, raw_label, full.masks[0].numpy(), base.rng(index))[2]
        kept = expected.any(axis=(1, 2))  # the crop may cut a detection away
        assert detections is not None and segments is not None
        labels, scores, masks = detections
        np.testing.assert_array_equal(masks.numpy(), expected[kept])
        np.testing.assert_array_equal(labels.numpy(), full.labels[0].numpy()[kept])
        np.testing.assert_array_equal(scores.numpy(), full.scores[0].numpy()[kept])
        assert segments.shape == (2, 32, 32) and segments.dtype == torch.int64
        assert int(segments[0].max()) < int(segments[1].max())  # the finer scale has more segments


def test_collate_pads_detections_and_stacks_superpixels(voc):
    dataset = HigherOrderDataset(
        open_dataset(voc, "val", transform=EvalTransform()), detections=voc / "Detections", superpixels=(12,)
    )
    samples = [dataset[0], dataset[1]]
    images, labels, detections, superpixels = collate_higher_order(samples)
    assert images.shape == (2, 3, 48, 64) and labels.shape == (2, 48, 64)
    counts = [len(s[2][0]) for s in samples]
    assert detections is not None and detections.labels.shape == (2, max(counts))
    for b, count in enumerate(counts):
        assert bool((detections.scores[b, :count] > 0).all()) and bool((detections.scores[b, count:] == 0).all())
        assert not bool(detections.masks[b, count:].any())  # padding rows are empty
    assert superpixels is not None and superpixels.segments.shape == (2, 1, 48, 64)
    # a batch without a single detection still has the images' size
    empty = [(s[0], s[1], (s[2][0][:0], s[2][1][:0], s[2][2][:0]), s[3]) for s in samples]
    assert collate_higher_order(empty)[2].masks.shape == (2, 0, 48, 64)


def test_an_image_without_a_file_has_no_detections_and_bad_folders_are_refused(voc, tmp_path):
    folder = tmp_path / "dets"
    folder.mkdir()
    (folder / "train_0001.json").write_text(json.dumps([{"label": 1, "score": 0.9, "box": [0, 0, 5, 5]}]))
    dataset = HigherOrderDataset(open_dataset(voc, "train", transform=EvalTransform()), detections=folder)
    assert len(dataset[0][2][0]) == 0 and len(dataset[1][2][0]) == 1 and dataset[0][3] is None
    with pytest.raises(FileNotFoundError, match="detections folder not found"):
        HigherOrderDataset(open_dataset(voc, "train"), detections=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no <sample id>\.json"):
        HigherOrderDataset(open_dataset(voc, "val"), detections=folder)
    with pytest.raises(ValueError, match="needs detections or superpixels"):
        HigherOrderDataset(open_dataset(voc, "train"))
    (folder / "train_0002.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        dataset[2]
