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
