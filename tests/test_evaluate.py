"""Metrics against hand-computed values and brute force; `crfasrnn evaluate --predictions` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crfasrnn.cli import main
from crfasrnn.data import make_synthetic_voc, open_dataset
from crfasrnn.evaluate import ConfusionMatrix, confusion_matrix, evaluate_predictions, segmentation_metrics
from crfasrnn.image import save_label_map

TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])


def test_confusion_and_metrics_by_hand():
    # kept pixels (truth, prediction): (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is ignored
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm, ["a", "b", "c", "d"])
    assert m.pixel_accuracy == 3 / 5
    assert m.mean_accuracy == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3, abs=1e-15)
    # IoU: a 1/(2+2-1), b 2/(2+3-2), c 0/(1+0-0); d absent everywhere -> NaN, left out of the mean
    assert m.iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0], abs=1e-15) and math.isnan(m.iou[3])
    assert m.mean_iou == pytest.approx(1 / 3, abs=1e-15)
    d = m.to_dict()
    assert d["iou"]["d"] is None and d["iou"]["b"] == pytest.approx(2 / 3)
    assert "mean IoU" in m.format_table() and "n/a" in m.format_table()


def test_confusion_matches_brute_force_and_accumulates():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 17, 19), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 5, (3, 17, 19), generator=g)
    brute = np.zeros((5, 5), np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            brute[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(pred, target, 5).numpy(), brute)
    acc = ConfusionMatrix(5)
    for i in range(3):  # batches add up
        acc.update(pred[i], target[i])
    np.testing.assert_array_equal(acc.matrix.numpy(), brute)
    m = acc.compute()
    tp = np.diag(brute)
    iou = tp / (brute.sum(0) + brute.sum(1) - tp)
    assert m.mean_iou == pytest.approx(iou.mean(), abs=1e-12)
    assert m.pixel_accuracy == pytest.approx(tp.sum() / brute.sum(), abs=1e-12)


def test_out_of_range_labels_are_errors():
    with pytest.raises(ValueError, match=r"target holds values \[7\] outside the class range 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 3)
    with pytest.raises(ValueError, match=r"prediction holds values \[3\] outside the class range 0..2"):
        confusion_matrix(torch.tensor([3, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"prediction holds values \[-1\]"):
        confusion_matrix(torch.tensor([-1, 1]), torch.tensor([0, 1]), 3)
    # a prediction under an ignored pixel is not checked (it is not counted either)
    assert confusion_matrix(torch.tensor([9, 1]), torch.tensor([255, 1]), 3).sum() == 1
    with pytest.raises(ValueError, match=r"shape \(2,\) differs from target shape \(3,\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="must be integers"):
        confusion_matrix(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3)


@pytest.fixture
def hand_made(tmp_path):
    """A 2-image VOC-layout dataset (3 classes) and hand-made predictions for it."""
    root = make_synthetic_voc(tmp_path / "data", num_train=1, num_val=2, size=(2, 3), num_classes=3)
    truth = {"val_0000": [[0, 0, 1], [1, 2, 255]], "val_0001": [[2, 2, 2], [0, 1, 1]]}
    preds = {"val_0000": [[0, 1, 1], [1, 0, 2]], "val_0001": [[2, 2, 0], [0, 1, 2]]}
    pred_dir = tmp_path / "pred"
    for stem, labels in truth.items():
        save_label_map(np.array(labels), root / "SegmentationClass" / f"{stem}.png")
        save_label_map(np.array(preds[stem]), pred_dir / f"{stem}.png")
    # counts (truth, pred): image 1: (0,0) (0,1) (1,1) (1,1) (2,0); image 2: (2,2) (2,2) (2,0) (0,0) (1,1) (1,2)
    # cm = [[2,1,0],[0,3,1],[2,0,2]]: IoU 0: 2/(3+4-2) = 2/5, 1: 3/(4+4-3) = 3/5, 2: 2/(4+3-2) = 2/5
    return root, pred_dir, [2 / 5, 3 / 5, 2 / 5]


def test_evaluate_predictions_hand_made(hand_made):
    root, pred_dir, iou = hand_made
    m = evaluate_predictions(open_dataset(root, "val"), pred_dir)
    assert m.confusion == [[2, 1, 0], [0, 3, 1], [2, 0, 2]]
    assert m.iou == pytest.approx(iou, abs=1e-15) and m.mean_iou == pytest.approx(7 / 15, abs=1e-15)
    assert m.pixel_accuracy == pytest.approx(7 / 11, abs=1e-15)


def test_cli_evaluate_predictions(hand_made, tmp_path, capsys):
    root, pred_dir, iou = hand_made
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--data", str(root), "--predictions", str(pred_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "46.67" in printed and "red" in printed  # mIoU 7/15 in percent; class names from classes.txt
    result = json.loads(out.read_text())["results"]["predictions"]
    assert list(result["iou"].values()) == pytest.approx(iou, abs=1e-15)
    assert result["mean_iou"] == pytest.approx(7 / 15, abs=1e-15)


def test_cli_evaluate_errors_are_one_line(hand_made, tmp_path, capsys):
    root, pred_dir, _ = hand_made
    (pred_dir / "val_0001.png").unlink()
    assert main(["evaluate", "--data", str(root), "--predictions", str(pred_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("crfasrnn evaluate: error: 1 of 2 predictions are missing") and "\n" not in err
    save_label_map(np.array([[0, 5, 1], [0, 0, 0]]), pred_dir / "val_0001.png")
    assert main(["evaluate", "--data", str(root), "--predictions", str(pred_dir)]) == 1
    assert "val_0001: prediction holds values [5] outside the class range 0..2" in capsys.readouterr().err
    save_label_map(np.zeros((3, 3)), pred_dir / "val_0001.png")
    assert main(["evaluate", "--data", str(root), "--predictions", str(pred_dir)]) == 1
    assert "is 3x3 but the ground truth" in capsys.readouterr().err


def test_cli_evaluate_plot(hand_made, tmp_path):
    pytest.importorskip("matplotlib")
    root, pred_dir, _ = hand_made
    chart = tmp_path / "iou.png"
    assert main(["evaluate", "--data", str(root), "--predictions", str(pred_dir), "--plot", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
