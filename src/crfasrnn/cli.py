"""The ``crfasrnn`` command line. Parses arguments, configures logging, and turns errors into one-line messages."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.output, num_iterations=args.iterations, device=args.device)
    for path in result.files:
        print(f"wrote {path}")
    share = 100.0 * result.changed_pixels / result.total_pixels
    print(
        f"CRF-RNN refinement changed the label of {result.changed_pixels} of {result.total_pixels} pixels "
        f"({share:.1f} %) in {result.seconds:.2f} s"
    )
    return 0


def _read_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in values.items()}


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    values = _read_toml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose", "config")}
    classes = given.pop("classes", None)
    if classes is not None:
        from pathlib import Path

        given["class_names"] = [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
    if isinstance(given.get("val_split"), str) and given["val_split"].lower() in ("", "none"):
        given["val_split"] = None
    values.update(given)
    return TrainConfig.from_dict(values)


def _progress(**kwargs):
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, unit="step", **kwargs)


def _train(args: argparse.Namespace) -> int:
    import os

    from .train import train

    config = _train_config(args)
    result = train(config, progress=_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.steps} steps ({result.epochs} epochs); final loss {result.final_loss:.4f}")
        for head, metrics in result.val.items():
            print(f"validation mIoU ({'CRF-RNN' if head == 'crf' else 'FCN'}): {100 * metrics.mean_iou:.2f} %")
        print(f"checkpoint: {result.checkpoint}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import EvalTransform, open_dataset
    from .evaluate import evaluate_model, evaluate_predictions, plot_class_iou, write_json

    class_names = None
    if args.classes:
        from pathlib import Path

        class_names = [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
    if args.weights:
        import torch

        from .initialise import model_from_file

        model, _ = model_from_file(args.weights, num_iterations=args.num_iterations)
        if args.num_classes is not None and args.num_classes != model.num_classes:
            raise ValueError(f"--num-classes {args.num_classes} but {args.weights} has {model.num_classes} classes")
        num_classes = model.num_classes
    else:
        num_classes = args.num_classes
    dataset = open_dataset(args.data, args.split, num_classes=num_classes, class_names=class_names, transform=EvalTransform())

    def bar(items):
        return tqdm(items, desc=f"evaluate {args.split}", unit="img", dynamic_ncols=True)

    if args.weights:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        results = evaluate_model(model, dataset, device=device, num_iterations=args.num_iterations, progress=bar)
        labels = {"fcn": "FCN-8s (no CRF)", "crf": f"CRF-RNN ({args.num_iterations} mean-field iterations)"}
    else:
        results = {"predictions": evaluate_predictions(dataset, args.predictions, progress=bar)}
        labels = {"predictions": f"predictions in {args.predictions}"}
    for head, metrics in results.items():
        print(f"== {labels[head]}: {args.split} split, {len(dataset)} images")
        print(metrics.format_table())
    if "crf" in results:
        gain = 100 * (results["crf"].mean_iou - results["fcn"].mean_iou)
        print(f"CRF gain: {gain:+.2f} mIoU points")
    if args.json:
        write_json(
            {
                "data": str(args.data),
                "split": args.split,
                "num_images": len(dataset),
                "source": str(args.weights or args.predictions),
                "results": {head: m.to_dict() for head, m in results.items()},
            },
            args.json,
        )
        print(f"wrote {args.json}")
    if args.plot:
        plot_class_iou({labels[h].split(" (")[0]: m for h, m in results.items()}, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _add_train_parser(sub) -> None:
    from .train import STAGES

    S = argparse.SUPPRESS  # options not given fall back to --config, then to TrainConfig's defaults
    p = sub.add_parser(
        "train",
        help="train FCN-8s / CRF-RNN on a VOC-format or folder dataset",
        description="Train FCN-8s (stage fcn), then the CRF alone (stage crf) or end to end (stage joint). "
        "Run under `torchrun --nproc_per_node=N -m crfasrnn train ...` for several processes / GPUs.",
        argument_default=S,
    )
    p.add_argument("--config", help="TOML file of options (same names as the flags; flags given here win)")
    p.add_argument("--data", help="dataset folder (PASCAL VOC layout or SPLIT/images + SPLIT/masks)")
    p.add_argument("--out", help="output folder: checkpoint last.pt, metrics.jsonl, curves.png")
    p.add_argument("--stage", choices=STAGES, help="fcn: FCN-8s alone; crf: CRF only (backbone frozen); joint: end to end")
    p.add_argument("--epochs", type=int, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, help="images per process and step (default 4)")
    p.add_argument("--lr", type=float, help="base learning rate (default 1e-3 for stage fcn, 1e-5 for crf / joint)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, help="weight decay of the weights (default 5e-4; none on biases)")
    p.add_argument("--schedule", choices=("poly", "step"), help="learning-rate schedule (default poly)")
    p.add_argument("--poly-power", type=float, help="power of the poly schedule (default 0.9)")
    p.add_argument("--step-size", type=int, help="step schedule: epochs between decays (default 10)")
    p.add_argument("--gamma", type=float, help="step schedule: decay factor (default 0.1)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up over N steps (default 0)")
    p.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm to this value (default: no clipping)")
    p.add_argument("--crf-lr-mult-kernel", type=float, help="lr multiplier of the CRF kernel weights (default 1000)")
    p.add_argument("--crf-lr-mult-compat", type=float, help="lr multiplier of the CRF compatibility (default 100)")
    p.add_argument("--crf-weight-decay", type=float, help="weight decay of the CRF parameters (default 0)")
    p.add_argument("--num-iterations-train", type=int, help="mean-field iterations in training (default 5)")
    p.add_argument("--num-iterations-test", type=int, help="mean-field iterations in validation (default 10)")
    p.add_argument("--init", help="initial weights: VGG-16 (torchvision layout), a checkpoint, or a weights file")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="data-loading worker processes (default 2)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--width", type=float, help="channel scale of the network, e.g. 0.0625 for a small model (default 1)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from classes.txt, else 21)")
    p.add_argument("--classes", help="file of class names, one per line")
    p.add_argument("--train-split", help="training split (default train; e.g. train_aug for SBD)")
    p.add_argument("--val-split", help="validation split, or none (default val)")
    p.add_argument("--crop-size", type=int, help="training crop size (default 320)")
    p.add_argument("--scale-min", type=float, help="smallest random scale (default 0.5)")
    p.add_argument("--scale-max", type=float, help="largest random scale (default 1.5)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="random horizontal flips (default on)")
    p.add_argument("--dropout", type=float, help="override the dropout probability of fc6/fc7 (0.5)")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: each epoch only)")
    p.add_argument("--log-every", type=int, help="write a metrics.jsonl record every N steps (default 10)")
    p.add_argument("--max-steps", type=int, help="stop after N steps in all (the schedule still spans --epochs)")
    p.set_defaults(func=_train)


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="mIoU of a network or of label PNGs on a dataset split",
        description="Confusion-matrix metrics (pixel accuracy, mean accuracy, per-class IoU, mean IoU; 255 ignored).",
    )
    p.add_argument("--data", required=True, help="dataset folder (PASCAL VOC layout or SPLIT/images + SPLIT/masks)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="network weights or training checkpoint: runs it with and without the CRF")
    source.add_argument("--predictions", help="folder of label PNGs named <id>.png")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the weights / classes.txt / 21)")
    p.add_argument("--classes", help="file of class names, one per line")
    p.add_argument("--num-iterations", type=int, default=10, help="mean-field iterations (default 10)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--plot", help="write a per-class IoU bar chart (PNG) here")
    p.set_defaults(func=_evaluate)


def _convert(args: argparse.Namespace) -> int:
    from .weights import convert_weights

    info = convert_weights(args.source, args.destination)
    meta = info.metadata
    print(
        f"wrote {info.path} ({info.format}, {info.num_classes} classes, from {meta.get('source_format')} "
        f"{meta.get('source_file')} sha256 {meta.get('source_sha256')})"
    )
    print(f"sha256 {info.sha256}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .segment import check_writable_folder, distributed_rank, expand_inputs, output_names, segment_file, shard
    from .weights import WEIGHTS_HELP, load_model

    weights = args.weights or os.environ.get("CRFASRNN_WEIGHTS")
    if not weights:
        raise ValueError(f"no weights given: {WEIGHTS_HELP}")
    rank, world = distributed_rank()
    paths = expand_inputs(args.images)
    names = output_names(paths)
    mine = shard(list(zip(paths, names)), rank, world)
    out_dir = check_writable_folder(args.output)
    device = args.device
    if device == "cuda" and world > 1 and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    model, info = load_model(weights, num_iterations=args.iterations, device=device)
    classes = info.classes
    failures = 0
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    bar = tqdm(mine, desc=f"{prefix}segment", unit="image", disable=args.quiet or len(mine) < 2, position=rank)
    for path, name in bar:
        try:
            result = segment_file(
                model, path, out_dir, class_names=classes, name=name, overlay=args.overlay,
                max_size=args.max_size, upscale=args.upscale,
            )
        except (ValueError, FileNotFoundError) as exc:  # a bad photo: report it and go on with the others
            failures += 1
            tqdm.write(f"crfasrnn segment: error: {exc}", file=sys.stderr)
            continue
        found = ", ".join(f"{cls} {100 * share:.1f}%" for _, cls, share in result.shares)
        written = str(result.label_path) + (f", {result.overlay_path}" if result.overlay_path else "")
        tqdm.write(f"{prefix}{path}: {found} -> {written}")
    if failures:
        raise ValueError(f"{failures} of {len(mine)} images could not be segmented")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crfasrnn", description="CRF-RNN semantic segmentation for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="refine a coarse segmentation of the bundled photo with the CRF-RNN layer")
    demo.add_argument("-o", "--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.set_defaults(func=_demo)

    convert = sub.add_parser(
        "convert",
        help="convert published CRF-RNN weights (Caffe .caffemodel or the PyTorch port's .pth) to this package's format",
    )
    convert.add_argument("source", help="TVG_CRFRNN_COCO_VOC.caffemodel, crfasrnn_weights.pth, or a file of ours")
    convert.add_argument("destination", help="output file: .safetensors (recommended) or .pt")
    convert.set_defaults(func=_convert)

    segment = sub.add_parser(
        "segment",
        help="segment photos into the 21 PASCAL VOC classes with the trained CRF-RNN network",
        description="Writes a palette PNG label map per image (and an overlay with --overlay). Under torchrun each "
        "process takes its share of the images (RANK / WORLD_SIZE).",
    )
    segment.add_argument("images", nargs="+", help="image files, folders or glob patterns (quote them)")
    segment.add_argument(
        "-w", "--weights", help="weights file (.caffemodel, the port's .pth, or converted); default: $CRFASRNN_WEIGHTS"
    )
    segment.add_argument("-o", "--output", default="segment-output", help="output folder (default: segment-output)")
    segment.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: cpu)")
    segment.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with a legend")
    segment.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    segment.add_argument("--max-size", type=int, default=500, help="longest side fed to the network (default: 500)")
    segment.add_argument("--upscale", action="store_true", help="also enlarge images smaller than --max-size")
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    segment.set_defaults(func=_segment)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"crfasrnn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
