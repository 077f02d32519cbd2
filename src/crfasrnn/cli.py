"""The ``crfasrnn`` command line. Parses arguments, configures logging, and turns errors into one-line messages."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.output, num_iterations=args.iterations, device=args.device)
    for path in result.files:
        print(f"wrote {path}")
    share = 100.0 * result.changed_pixels / max(result.labelled_pixels, 1)
    print(
        f"CRF refinement changed the label of {result.changed_pixels} of the {result.labelled_pixels} labelled pixels "
        f"({share:.1f} %) and labelled the {result.unknown_pixels} unknown pixels, in {result.seconds:.2f} s"
    )
    if result.warmup_seconds > 1.0:
        print(
            f"(before that, {result.warmup_seconds:.1f} s went into compiling the CPU kernels: a one-time cost, they "
            "are cached on disk for later runs)"
        )
    return 0


def _read_toml(path: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, from PyPI
        import tomli as tomllib

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

    from .train import train

    config = _train_config(args)
    result = train(config, progress=_progress)
    from .distributed import process_rank

    if process_rank()[0] == 0:
        print(f"trained {result.steps} steps ({result.epochs} epochs); final loss {result.final_loss:.4f}")
        for head, metrics in result.val.items():
            print(f"validation mIoU ({'CRF-RNN' if head == 'crf' else 'FCN'}): {100 * metrics.mean_iou:.2f} %")
        print(f"checkpoint: {result.checkpoint}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import EvalTransform, open_dataset
    from .evaluate import evaluate_model, evaluate_predictions, plot_class_iou, write_json
    from .files import check_output

    if args.json:  # before the work: a folder, a device or a wrong extension would only fail at the end
        check_output(args.json, suffixes=(".json",))
    if args.plot:
        check_output(args.plot)
    class_names = None
    if args.classes:
        from pathlib import Path

        class_names = [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
    if args.weights:
        import torch

        from .weights import load_model

        model, info = load_model(args.weights, num_iterations=args.num_iterations)
        if args.num_classes is not None and args.num_classes != model.num_classes:
            raise ValueError(f"--num-classes {args.num_classes} but {args.weights} has {model.num_classes} classes")
        num_classes = model.num_classes
    else:
        num_classes = args.num_classes
    dataset = open_dataset(
        args.data, args.split, num_classes=num_classes, class_names=class_names, transform=EvalTransform()
    )
    if args.weights:
        dataset = _with_higher_order(args, model, info, dataset)
    elif args.detections is not None or args.superpixels is not None:
        raise ValueError("--detections and --superpixels are inputs of a network's CRF: they need --weights")

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


def _with_higher_order(args: argparse.Namespace, model, info, dataset):
    """``dataset`` with the detections and superpixels that the model's higher-order potentials take (the
    superpixel counts by default those of its training), or unchanged for a CRF without them."""
    from .data.higher_order import HigherOrderDataset

    potentials = getattr(getattr(model, "crf", None), "higher_order", None)
    if potentials is None:
        if args.detections is not None or args.superpixels is not None:
            raise ValueError(f"{args.weights} has no higher-order potentials: --detections and --superpixels need them")
        return dataset
    counts = args.superpixels
    if counts is None and potentials.superpixel_scales:
        counts = info.metadata.get("higher_order", {}).get("superpixels")
        if not counts or len(counts) != potentials.superpixel_scales:
            raise ValueError(
                f"{args.weights} has {potentials.superpixel_scales} superpixel scale(s) but records no SLIC counts: "
                "give --superpixels"
            )
    if counts is not None and len(counts) != potentials.superpixel_scales:
        raise ValueError(f"{args.weights} takes {potentials.superpixel_scales} superpixel scale(s), got {len(counts)}")
    if args.detections is not None and not potentials.detections:
        raise ValueError(f"{args.weights} has no detection potential: --detections needs one")
    if args.detections is None and potentials.detections:
        logger.warning("%s has a detection potential but no --detections were given: it is left out", args.weights)
    if args.detections is None and not counts:
        return dataset
    return HigherOrderDataset(dataset, detections=args.detections, superpixels=counts or ())


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
    p.add_argument(
        "--stage", choices=STAGES, help="fcn: FCN-8s alone; crf: CRF only (backbone frozen); joint: end to end"
    )
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
    p.add_argument(
        "--crf-loss-weight",
        type=float,
        help="weakly supervised training: add the dense-CRF loss with this weight to the partial cross-entropy on "
        "the labelled pixels (255 = unlabelled), e.g. 2e-9 as in the paper (default 0: off)",
    )
    p.add_argument("--crf-loss-sigma-rgb", type=float, help="colour bandwidth of the dense-CRF loss (default 15)")
    p.add_argument("--crf-loss-sigma-xy", type=float, help="spatial bandwidth of the dense-CRF loss (default 100)")
    p.add_argument("--crf-loss-scale", type=float, help="scale the dense-CRF loss is computed at (default 0.5)")
    p.add_argument(
        "--crf-loss-start-epoch",
        type=int,
        help="add the dense-CRF loss from this epoch on, after partial cross-entropy alone (default 0: from the start)",
    )
    p.add_argument(
        "--crf-loss-normalized",
        action="store_true",
        help="the dense-CRF loss with the normalised affinity D^-1/2 W D^-1/2 (default: W)",
    )
    p.add_argument(
        "--detections",
        help="higher-order detection potential (stages crf / joint): folder of <sample id>.json detection files "
        "(boxes or masks, labels, scores; see crfasrnn refine --detections), for both splits",
    )
    p.add_argument(
        "--superpixels",
        type=_segment_counts,
        metavar="N[,N2,...]",
        help="higher-order superpixel potential (stages crf / joint): SLIC on every training crop, about N segments, "
        "one scale per count (needs scikit-image)",
    )
    p.add_argument(
        "--superpixel-potential",
        choices=("mean", "potts"),
        help="superpixel term: mean (caffe-tvg's released form, default) or potts (the paper's Pn-Potts)",
    )
    p.add_argument(
        "--crf-lr-mult-higher-order", type=float, help="lr multiplier of the higher-order weights (default 1000)"
    )
    p.add_argument(
        "--higher-order-init",
        type=float,
        help="start every higher-order weight at this value (default: w_x = w_y = 1, 0.5 per superpixel scale)",
    )
    p.add_argument("--num-iterations-train", type=int, help="mean-field iterations in training (default 5)")
    p.add_argument("--num-iterations-test", type=int, help="mean-field iterations in validation (default 10)")
    p.add_argument("--init", help="initial weights: VGG-16 (torchvision layout), a checkpoint, or a weights file")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="data-loading worker processes (default 2)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument(
        "--width", type=float, help="channel scale of the network, e.g. 0.0625 for a small model (default 1)"
    )
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
    p.add_argument(
        "--detections", help="give the CRF's detection potential these detections: a folder of <id>.json files"
    )
    p.add_argument(
        "--superpixels",
        type=_segment_counts,
        metavar="N[,N2,...]",
        help="give the CRF's superpixel potential SLIC superpixels of about N segments per scale (default: the "
        "counts the weights were trained with)",
    )
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

    from .distributed import process_rank, shard
    from .inputs import expand_inputs, output_names
    from .segment import check_writable_folder, segment_file
    from .weights import load_model
    from .weights.hub import DEFAULT_WEIGHTS, WEIGHTS_ENV

    weights = args.weights or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS
    rank, world = process_rank()
    paths = expand_inputs(args.images)
    names = output_names(paths)
    mine = shard(list(zip(paths, names)), rank, world)
    device = args.device
    if device == "cuda" and world > 1 and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    model, info = load_model(weights, num_iterations=args.iterations, device=device)  # before the output folder exists
    out_dir = check_writable_folder(args.output)
    classes = info.classes
    failures = 0
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    bar = tqdm(mine, desc=f"{prefix}segment", unit="image", disable=args.quiet or len(mine) < 2, position=rank)
    for path, name in bar:
        try:
            result = segment_file(
                model,
                path,
                out_dir,
                class_names=classes,
                name=name,
                overlay=args.overlay,
                max_size=args.max_size,
                upscale=args.upscale,
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


# ---------------------------------------------------------------------------------------------------------- refine


def _unknown(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _refine_one(args: argparse.Namespace, image_path: Path, source: Path, *, num_iterations: int, several: bool):
    """Read one job's inputs and refine them; returns (photo, annotation or None, coarse labels or None, refined)."""
    from .image import read_annotation, read_image, read_probabilities
    from .refine import refine

    photo = read_image(image_path)
    params = {
        "num_iterations": num_iterations,
        "theta_alpha": args.theta_alpha,
        "theta_beta": args.theta_beta,
        "theta_gamma": args.theta_gamma,
        "spatial_weight": args.spatial_weight,
        "bilateral_weight": args.bilateral_weight,
        "device": args.device,
        "superpixels": args.superpixels,
        "superpixel_weight": args.superpixel_weight,
        "detection_weight": args.detection_weight,
    }
    try:
        if args.detections is not None:
            params["detections"] = _detections_for(args.detections, image_path, photo.shape[:2], args.num_classes)
        if args.labels is not None:
            annotation = read_annotation(source, labels_as=args.labels_as, unknown_label=args.unknown)
            num_classes = args.num_classes if args.num_classes is not None else annotation.num_classes
            refined = refine(
                photo,
                labels=annotation.labels,
                num_classes=num_classes,
                gt_prob=args.gt_prob,
                unknown_label=annotation.unknown_label,
                **params,
            )
            return photo, annotation, annotation.labels, refined
        probs = read_probabilities(source, photo.shape[:2])
        refined = refine(photo, probs=probs, num_classes=args.num_classes, normalize=args.normalize, **params)
        return photo, None, None, refined
    except ValueError as exc:
        if not several or str(image_path) in str(exc):
            raise
        raise ValueError(f"{image_path}: {exc}") from None


def _detections_for(where: Path, image_path: Path, size: tuple[int, int], num_classes: int | None):
    """The detections of one photo: ``where`` is a JSON file, or a folder of ``<image stem>.json`` files (an image
    without one has no detections)."""
    from .higher_order import read_detections, read_image_detections

    if where.is_dir():
        return read_image_detections(where, image_path.stem, size, num_classes)
    return read_detections(where, size, num_classes)


def _segment_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected superpixel counts like 100,200,400, got {text!r}") from None
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"superpixel counts must be >= 1, got {text!r}")
    return counts


def _refine_volume(args: argparse.Namespace) -> int:
    """`crfasrnn refine` of a 3-D volume (.npy, .nii, .nii.gz): one volume, one label volume written."""
    from .volume import refine_volume_file

    if args.overlay:
        raise ValueError("--overlay is for photos: volumes are written as label volumes only")
    if args.labels_as != "auto":
        raise ValueError("--labels-as is for PNG label maps: volume labels are integers")
    if args.superpixels is not None or args.detections is not None:
        raise ValueError("--superpixels and --detections are for photos: volumes take the pairwise kernels only")
    result = refine_volume_file(
        args.image,
        args.output,
        labels=args.labels,
        probs=args.probs,
        spacing=args.spacing,
        num_classes=args.num_classes,
        num_iterations=args.iterations,
        theta_alpha=args.theta_alpha,
        theta_beta=args.theta_beta,
        theta_gamma=args.theta_gamma,
        spatial_weight=args.spatial_weight,
        bilateral_weight=args.bilateral_weight,
        gt_prob=args.gt_prob,
        unknown_label=args.unknown,
        normalize=args.normalize,
        device=args.device,
    )
    print(result.summary())
    return 0


def _refine(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .image import overlay, save_annotation, save_image, save_label_map, voc_palette
    from .inputs import is_pattern, refine_jobs
    from .refine import check_parameters, label_changes

    check_parameters(
        num_iterations=args.iterations,
        theta_alpha=args.theta_alpha,
        theta_beta=args.theta_beta,
        theta_gamma=args.theta_gamma,
        spatial_weight=args.spatial_weight,
        bilateral_weight=args.bilateral_weight,
        gt_prob=args.gt_prob,
        num_classes=args.num_classes,
        superpixel_weight=args.superpixel_weight,
        detection_weight=args.detection_weight,
    )
    from .volume import volume_format

    if volume_format(args.image) is not None and not is_pattern(args.image) and not Path(args.image).is_dir():
        return _refine_volume(args)
    if args.spacing is not None:
        raise ValueError("--spacing is for volumes (.npy, .nii, .nii.gz); photos are refined in pixels")
    if args.detections is not None and not args.detections.exists():
        raise ValueError(f"--detections {args.detections} does not exist (a JSON file, or a folder of them)")
    kind = "labels" if args.labels is not None else "probs"
    jobs = refine_jobs(args.image, args.labels if kind == "labels" else args.probs, args.output, kind=kind)
    from .files import check_output

    for image_path, source, output in jobs:  # the targets first: nothing is computed for an output that cannot be
        check_output(output, inputs=(image_path, source), suffixes=(".png",))
        if args.overlay:
            check_output(output.with_name(f"{output.stem}_overlay.png"), inputs=(image_path, source))
    # First pass: read and check every input (the unary is built, no iteration run) before anything is written.
    for image_path, source, _ in tqdm(jobs, desc="checking", unit="image", disable=len(jobs) < 2):
        _refine_one(args, image_path, source, num_iterations=0, several=len(jobs) > 1)
    changed = labelled = unknown = total = 0
    for image_path, source, output in tqdm(jobs, desc="refining", unit="image", disable=len(jobs) < 2):
        photo, annotation, coarse, refined = _refine_one(
            args, image_path, source, num_iterations=args.iterations, several=len(jobs) > 1
        )
        colors = voc_palette() if annotation is None else annotation.colors()
        blend = overlay(photo, refined, colors) if args.overlay else None
        if annotation is None:
            save_label_map(refined, output)
        else:
            save_annotation(annotation, refined, output)
            counts = label_changes(coarse, refined, annotation.unknown_label)
            changed, labelled, unknown = changed + counts[0], labelled + counts[1], unknown + counts[2]
        total += refined.size
        if blend is not None:
            save_image(blend, output.with_name(f"{output.stem}_overlay.png"))
        if len(jobs) == 1:
            overlay_note = f" and {output.with_name(output.stem + '_overlay.png')}" if args.overlay else ""
            print(f"wrote {output}{overlay_note}")
    if len(jobs) > 1:
        print(f"wrote {len(jobs)} refined label maps to {jobs[0][2].parent}")
    if args.labels is not None:
        print(f"changed the label of {changed} of {labelled} labelled pixels and labelled {unknown} unknown pixels")
    return 0


def _add_max_pixels(parser) -> None:
    from .image import DEFAULT_MAX_PIXELS

    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse image files of more than N pixels, read from their headers (default: "
        f"{DEFAULT_MAX_PIXELS}, 4096x4096; 0: no limit)",
    )


def _add_refine_parser(sub) -> None:
    p = sub.add_parser(
        "refine",
        help="refine a rough label map or class probabilities of a photo or a 3-D volume with a dense CRF",
        description="Dense-CRF refinement of a label map (--labels) or class probabilities (--probs) of IMAGE. IMAGE "
        "may be a folder or a glob pattern; then --labels/--probs is a folder of <name>.png / <name>.npy files and -o "
        "a folder. Label maps: palette PNGs (VOC colours or a grey ramp) and grey PNGs are read as integers and keep "
        "their format; RGB annotations (and palette PNGs with other colours) have one class per colour and black "
        "for unknown, and are written back in their colours. Probabilities: .npy arrays (C, H, W) or (H, W, C), "
        "possibly at a lower resolution with the image's aspect ratio. "
        "3-D volumes: an IMAGE ending in .npy ((D, H, W) or (D, H, W, channels) intensities, e.g. several MRI "
        "modalities) or .nii / .nii.gz (NIfTI, read with nibabel: pip install 'crfasrnn[nifti]'; axes X, Y, Z[, "
        "channels] as stored) is refined as a volume: --labels is an integer volume of its spatial shape, --probs "
        "(C, D, H, W) .npy or NIfTI (X, Y, Z, classes); the output is written in the volume's format (a NIfTI keeps "
        "the affine and header). Distances (--theta-gamma, --theta-alpha) are then in the voxel spacing's units (mm "
        "for NIfTI: header.get_zooms(), or --spacing), --theta-beta in the volume's intensity units, and the kernels "
        "are normalised symmetrically (pydensecrf's default; photos keep CRF-RNN's per-pixel normalisation).",
    )
    p.add_argument("image", help="photo, folder of photos, glob pattern (quote it), or volume (.npy, .nii, .nii.gz)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="label map PNG (or folder of them); for a volume: label volume .npy / NIfTI")
    src.add_argument(
        "--probs",
        help="class probabilities .npy (or folder of them); for a volume: (C, D, H, W) .npy or (X, Y, Z, C) NIfTI",
    )
    p.add_argument(
        "-o",
        "--output",
        help="output PNG, or folder (default: <image>_refined.png; for folders: refined/); "
        "for a volume: .npy or .nii / .nii.gz like the input (default: <volume>_refined.<ending>)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("A", "B", "C"),
        help="volumes: voxel size along the three array axes (default: the NIfTI header's, else 1 1 1)",
    )
    p.add_argument("--overlay", action="store_true", help="also write <output>_overlay.png (photo blended with labels)")
    p.add_argument(
        "--labels-as",
        choices=("auto", "index", "color"),
        default="auto",
        help="read the label map as integers or as one class per colour (default: auto, see above)",
    )
    p.add_argument(
        "--unknown",
        type=_unknown,
        default=255,
        help="label value of unlabelled pixels in integer maps, or 'none' (default: 255)",
    )
    p.add_argument("--num-classes", type=int, help="class count (default: largest label + 1, or the colour count)")
    p.add_argument("--normalize", action="store_true", help="rescale probabilities to sum to 1 instead of refusing")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    p.add_argument(
        "--theta-alpha",
        type=float,
        default=80.0,
        help="bilateral kernel, position bandwidth in pixels, for volumes in spacing units (pydensecrf "
        "bilateral sxy; default: 80)",
    )
    p.add_argument(
        "--theta-beta",
        type=float,
        default=13.0,
        help="bilateral kernel, colour bandwidth in 0..255, for volumes in intensity units (pydensecrf "
        "srgb; default: 13)",
    )
    p.add_argument(
        "--theta-gamma",
        type=float,
        default=3.0,
        help="spatial kernel bandwidth in pixels, for volumes in spacing units, e.g. mm (pydensecrf "
        "Gaussian sxy; default: 3)",
    )
    p.add_argument(
        "--spatial-weight",
        type=float,
        default=3.0,
        help="spatial kernel Potts weight (pydensecrf Gaussian compat; default: 3)",
    )
    p.add_argument(
        "--bilateral-weight",
        type=float,
        default=10.0,
        help="bilateral kernel Potts weight (pydensecrf bilateral compat; default: 10)",
    )
    p.add_argument(
        "--gt-prob",
        type=float,
        default=0.7,
        help="confidence in the given labels, as pydensecrf's unary_from_labels (default: 0.7)",
    )
    p.add_argument(
        "--superpixels",
        type=_segment_counts,
        metavar="N[,N2,...]",
        help="add the superpixel potential (Arnab et al., ECCV 2016) over SLIC superpixels, about N per image, one "
        "scale per count (needs scikit-image: pip install 'crfasrnn[superpixels]')",
    )
    p.add_argument(
        "--superpixel-weight", type=float, default=0.5, help="weight of each superpixel scale (default: 0.5)"
    )
    p.add_argument(
        "--detections",
        type=Path,
        metavar="FILE.json",
        help="add the detection potential: a JSON list of {label, score, box: [x0, y0, x1, y1] | mask: PNG}; for "
        "several images, a folder of <image stem>.json files",
    )
    p.add_argument("--detection-weight", type=float, default=4.0, help="weight of the detection potential (default: 4)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_max_pixels(p)
    p.set_defaults(func=_refine)


def _serve(args: argparse.Namespace) -> int:
    try:
        from . import serve
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            f"the web app needs the serve extra: pip install 'crfasrnn[serve]' ({exc})"
        ) from None

    if not math.isfinite(args.max_upload_mb) or args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be a finite number > 0, got {args.max_upload_mb}")
    if not math.isfinite(args.body_timeout) or args.body_timeout <= 0:
        raise ValueError(f"--body-timeout must be a finite number > 0, got {args.body_timeout}")
    limits = serve.Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_side=args.max_side,
        downscale=not args.refuse_oversize,
        work_side=args.work_side,
        max_decodes=args.max_decodes,
        body_timeout_s=args.body_timeout,
    )
    weights = args.weights or os.environ.get("CRFASRNN_WEIGHTS") or None
    if weights:
        engine = serve.Engine.from_weights(weights, device=args.device, limits=limits, num_iterations=args.iterations)
    else:
        engine = serve.Engine(device=args.device, limits=limits)
    host = f"[{args.host}]" if ":" in args.host else args.host
    what = f"segmentation with {Path(str(weights)).name}" if weights else "refinement (no --weights given)"
    print(f"crfasrnn serve: {what} on http://{host}:{args.port}/ (Ctrl+C stops)", flush=True)
    serve.run_server(engine, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _weights(args: argparse.Namespace) -> int:
    """``crfasrnn weights list|download|verify|path``."""
    from .weights import fetch_weights, read_weights
    from .weights.hub import REGISTRY, cache_dir, cached_path, url_of, verify

    if args.action == "list":
        for name, entry in REGISTRY.items():
            state = "cached" if cached_path(name).is_file() else "not downloaded"
            print(f"{name:16} {entry.filename:32} {state:15} {entry.description}")
            print(f"{'':16} {url_of(name)}")
        return 0
    if args.action == "path":
        print(cache_dir() if args.name is None else cached_path(args.name))
        return 0
    if args.name is None:
        raise ValueError(f"crfasrnn weights {args.action} needs a published name, a URL or a file")
    if args.action == "download":
        path = fetch_weights(args.name, url=args.url)
        print(f"{args.name}: {path}")
        return 0
    path = verify(args.name)  # checksums: the published sha1, the sha256 recorded at download
    _, info = read_weights(path, allow_backbone=True)  # structure: it reads as weights
    published = REGISTRY.get(args.name)
    check = " (matches the published sha1)" if published is not None and published.sha1 else ""
    print(
        f"{args.name}: {info.format}, {info.num_classes} classes, width {info.metadata.get('width', 1.0):g}; "
        f"sha256 {info.sha256}{check}"
    )
    return 0


def _add_weights_parser(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="the published weights: list them, download them ahead of use, verify a file, show the cache",
        description="Downloads go to torch.hub's cache ($TORCH_HOME/hub/checkpoints), are verified (the published "
        "sha1 where there is one, else by reading them), and are then used offline. CRFASRNN_WEIGHTS_BASE_URL "
        "replaces the published hosts (a mirror). The published model is for non-commercial use only.",
    )
    p.add_argument("action", choices=["list", "download", "verify", "path"])
    p.add_argument("name", nargs="?", help="a published name (see list), a URL, or (verify) a file")
    p.add_argument("--url", help="download: fetch the published file from this mirror (still checked by its sha1)")
    p.set_defaults(func=_weights)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the live demo: a web page and JSON API that segment or refine uploaded photos",
        description="Serve the demo page and its JSON API (POST /api/segment, POST /api/refine, GET /api/info). "
        "With --weights (or CRFASRNN_WEIGHTS): CRF-RNN segmentation; without: dense-CRF refinement of label maps.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--weights",
        help="a weights file, an http(s) URL or a published name (crfasrnn weights list); default: $CRFASRNN_WEIGHTS",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--iterations", type=int, default=10, help="CRF iterations of the network (default: 10)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload per request in MiB (default: 10)")
    p.add_argument(
        "--max-side",
        type=int,
        default=4096,
        help="largest accepted image side in pixels; larger images are downscaled (default: 4096)",
    )
    p.add_argument(
        "--refuse-oversize",
        action="store_true",
        help="refuse images larger than --max-side instead of downscaling them",
    )
    p.add_argument(
        "--work-side",
        type=int,
        default=1024,
        help="longest side at which photos are processed and results returned (default: 1024)",
    )
    p.add_argument(
        "--max-decodes", type=int, default=2, help="uploads decoded at once; other requests wait (default: 2)"
    )
    p.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (default: 30)"
    )
    p.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crfasrnn", description="CRF-RNN semantic segmentation for PyTorch.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details, and show the full traceback of any error"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="refine the bundled coarse annotation of the bundled photo with a dense CRF")
    demo.add_argument("-o", "--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.set_defaults(func=_demo)

    convert = sub.add_parser(
        "convert",
        help="convert published CRF-RNN weights (Caffe .caffemodel or the PyTorch port's .pth) to this package's "
        "format",
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
        "-w",
        "--weights",
        help="a weights file (.caffemodel, the port's .pth, ours), an http(s) URL, or a published name (crfasrnn "
        "weights list; downloaded once into the cache); default: $CRFASRNN_WEIGHTS, else voc-coco",
    )
    segment.add_argument("-o", "--output", default="segment-output", help="output folder (default: segment-output)")
    segment.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: cpu)")
    segment.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png with a legend")
    segment.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    segment.add_argument("--max-size", type=int, default=500, help="longest side fed to the network (default: 500)")
    segment.add_argument("--upscale", action="store_true", help="also enlarge images smaller than --max-size")
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_max_pixels(segment)
    segment.set_defaults(func=_segment)
    _add_refine_parser(sub)
    _add_serve_parser(sub)
    _add_weights_parser(sub)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    return parser


def _out_of_memory(exc: BaseException) -> bool:
    """Whether an exception says that host or device memory ran out (``MemoryError``, torch's ``OutOfMemoryError``)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return isinstance(oom, type) and isinstance(exc, oom)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import USER_ERRORS  # (after parsing: --help needs no torch)

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if getattr(args, "max_pixels", None) is not None:
            from .image import set_max_pixels

            if args.max_pixels < 0:
                raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
            set_max_pixels(args.max_pixels or None)
        return args.func(args)
    except USER_ERRORS as exc:  # the user's mistakes (values, types, files, a missing extra): one line
        if args.verbose:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the exception's text
        print(f"crfasrnn {args.command}: error: {message}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:  # out of memory is no bug, but no mistake either: say what ran out
        if args.verbose or not _out_of_memory(exc):
            raise  # an internal error: its traceback is what a bug report needs
        message = " ".join(str(exc).split())[:300]
        print(
            f"crfasrnn {args.command}: error: out of memory ({type(exc).__name__}: {message}); try a smaller input "
            "(--max-pixels), a smaller batch, or another device",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
