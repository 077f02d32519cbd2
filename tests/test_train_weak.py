"""Weakly supervised training: scribble labels from the generator, partial cross-entropy + the dense-CRF loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from crfasrnn.cli import main
from crfasrnn.data import make_synthetic_voc
from crfasrnn.train import TrainConfig

RECIPE = {
    "stage": "fcn",
    "width": 1 / 16,
    "batch_size": 4,
    "crop_size": 48,
    "workers": 0,
    "device": "cpu",
    "epochs": 2,
    "lr": 3e-3,
    "warmup_steps": 4,
    "clip_grad_norm": 2.0,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def scribble_voc(tmp_path_factory):
    return make_synthetic_voc(
        tmp_path_factory.mktemp("scribbles"), num_train=8, num_val=4, size=(48, 64), scribbles=True, seed=2
    )


def test_the_generator_writes_scribbles_for_training_and_full_labels_for_validation(scribble_voc):
    train = np.asarray(Image.open(scribble_voc / "SegmentationClass" / "train_0000.png"))
    val = np.asarray(Image.open(scribble_voc / "SegmentationClass" / "val_0000.png"))
    labelled = float((train != 255).mean())
    assert 0.01 < labelled < 0.15, labelled  # a few percent of the pixels
    assert len(np.unique(train[train != 255])) >= 2  # the background and at least one object
    assert (val != 255).all()


@pytest.mark.parametrize("weight", [0.0, 2e-5])
def test_partial_cross_entropy_plus_the_crf_loss_is_one_flag(scribble_voc, tmp_path, weight):
    out = tmp_path / "run"
    args = ["train", "--data", str(scribble_voc), "--out", str(out), "--crf-loss-weight", str(weight)]
    args += ["--crf-loss-sigma-xy", "20", "--crf-loss-scale", "0.5"]
    for key, value in RECIPE.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    if weight == 0:
        assert all("crf_loss" not in r for r in steps)
    else:  # both terms recorded: the cross-entropy on the scribbles and the (negative) dense-CRF energy
        assert all(r["crf_loss"] < 0 for r in steps)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("crf_loss_weight", -1.0, "crf_loss_weight must be a finite number >= 0"),
        ("crf_loss_sigma_xy", 0.0, "crf_loss_sigma_xy must be a finite number > 0"),
        ("crf_loss_scale", 1.5, r"crf_loss_scale must lie in \(0, 1\]"),
    ],
)
def test_bad_crf_loss_options(option, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="d", out="o", lr=1e-3, **{option: value}).validate()
