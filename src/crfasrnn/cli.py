"""The ``crfasrnn`` command line. Parses arguments, configures logging, and turns errors into one-line messages."""

from __future__ import annotations

import argparse
import logging
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crfasrnn", description="CRF-RNN semantic segmentation for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="refine a coarse segmentation of the bundled photo with the CRF-RNN layer")
    demo.add_argument("-o", "--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.set_defaults(func=_demo)
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
