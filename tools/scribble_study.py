"""Partial cross-entropy alone against partial cross-entropy + the dense-CRF loss, on generated scribble data.

For each seed: generate a scribble dataset (``make_synthetic_voc(scribbles=True)``: training images with scribbles,
held-out images with full labels), train the FCN stage once per loss weight (0 is partial cross-entropy alone) with
the same steps, and print the held-out mIoU of each and its gain over weight 0. ``--full`` trains on full labels
instead, on the same images (the ceiling). The defaults are the recipe of the README's table: 96x128 images whose
scribbles stay 6 pixels inside their regions, 32 epochs, the normalised loss with weight 1e-3 added from epoch 16 (on a
partial-CE network trained to convergence, as rloss fine-tunes one). Its figures come from

    python tools/scribble_study.py --seeds 1,2,3,4 --threads 1
    python tools/scribble_study.py --seeds 1,2,3,4 --full --threads 1
    python tools/scribble_study.py --seeds 1,2,3,4 --scribble-margin 2 --threads 1   # strokes reaching the edges
    python tools/scribble_study.py --seeds 0,5 --weights 0,1e-3,2e-3,3e-3 --scribble-margin 2 --threads 1  # tuning
    python tools/scribble_study.py --seeds 1,2,3,4 --epochs 16 --start-epoch 8 --scribble-margin 2 --threads 1
    python tools/scribble_study.py --seeds 1,2,3,4 --weights 0,2e-3 --epochs 48 --start-epoch 24 --scribble-margin 2 \
        --threads 1

(about 160 s per training at 96x128 with one thread; ``--threads 1`` makes a training deterministic, so two studies
on different seeds may run side by side on two cores).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from crfasrnn.data import make_synthetic_voc
from crfasrnn.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--weights", default="0,1e-3", help="dense-CRF loss weights (0: partial cross-entropy alone)")
    parser.add_argument("--full", action="store_true", help="train on full labels (weight 0 only)")
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--sigma-rgb", type=float, default=15.0)
    parser.add_argument("--sigma-xy", type=float, default=10.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--start-epoch", type=int, default=16)
    parser.add_argument("--normalized", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--scribble-margin", type=int, default=6, help="pixels a stroke stays inside its region")
    parser.add_argument("--size", default="96x128", help="image size HxW (training crops are H x H)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (1: deterministic; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = [0.0] if args.full else [float(w) for w in args.weights.split(",")]
    height, width = (int(v) for v in args.size.lower().split("x"))
    for seed in (int(s) for s in args.seeds.split(",")):
        root = make_synthetic_voc(
            tempfile.mkdtemp(),
            num_train=args.num_train,
            num_val=args.num_val,
            size=(height, width),
            scribbles=True,
            scribble_margin=args.scribble_margin,
            keep_full_labels=args.full,
            seed=seed,
        )
        if args.full:  # the same images with their full labels
            for path in Path(root, "SegmentationClassFull").iterdir():
                shutil.copyfile(path, Path(root, "SegmentationClass", path.name))
        scores = []
        for weight in weights:
            config = TrainConfig(
                data=str(root),
                out=tempfile.mkdtemp(),
                stage="fcn",
                width=1 / 16,
                batch_size=4,
                crop_size=height,
                workers=0,
                device="cpu",
                epochs=args.epochs,
                lr=args.lr,
                warmup_steps=16,
                clip_grad_norm=2.0,
                log_every=1000,
                seed=seed,
                scale_min=0.75,
                scale_max=1.25,
                crf_loss_weight=weight,
                crf_loss_sigma_rgb=args.sigma_rgb,
                crf_loss_sigma_xy=args.sigma_xy,
                crf_loss_scale=args.scale,
                crf_loss_start_epoch=args.start_epoch,
                crf_loss_normalized=args.normalized,
            )
            miou = 100 * train(config).val["fcn"].mean_iou
            scores.append(miou)
            label = "full labels" if args.full else f"weight {weight:g}"
            print(f"seed {seed}  {label:<14} held-out mIoU {miou:5.1f}  gain {miou - scores[0]:+5.1f}", flush=True)


if __name__ == "__main__":
    main()
