"""The demonstration behind ``make demo``: dense-CRF refinement of the bundled coarse annotation of the bundled photo.

No trained weights are needed. The annotation (``data/astronaut_coarse.png``, made by ``tools/make_demo_annotation.py``)
is what a rough labeller or a low-resolution network gives: five classes on a 10-pixel block grid, with a band of
unknown pixels along every boundary. :func:`crfasrnn.refine.refine` labels the unknown pixels and moves the block
boundaries onto the photo's edges.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .image import (
    bundled_annotation_path,
    bundled_photo_path,
    figure_with_legend,
    overlay,
    read_annotation,
    read_image,
    save_annotation,
    save_image,
)
from .refine import refine

__all__ = ["DEMO_CLASSES", "run_demo", "DemoResult"]

logger = logging.getLogger(__name__)

#: The classes of the bundled annotation, by label value (255 is unknown).
DEMO_CLASSES = ("background", "person", "flag", "shuttle model", "helmet")
UNKNOWN_COLOR = (255, 255, 255)


@dataclass
class DemoResult:
    """What the demo wrote and measured."""

    output_dir: Path
    files: list[Path]
    changed_pixels: int  #: labelled pixels of the annotation whose label the refinement changed
    labelled_pixels: int
    unknown_pixels: int  #: pixels without a label in the annotation (all get one)
    total_pixels: int
    seconds: float  #: time of the refinement itself
    warmup_seconds: float = 0.0  #: compiling (first run) or loading the CPU kernels, before the refinement


def run_demo(output_dir: str | Path, *, num_iterations: int = 10, device: str = "cpu") -> DemoResult:
    """Refine the bundled annotation of the bundled photo and write the figures to ``output_dir``.

    Writes ``output.png`` (the refined labels, palette PNG with the annotation's VOC colours), ``overlay.png`` (the
    photo blended with the refined labels) and ``comparison.png`` (photo | coarse annotation | refined, with a legend).
    Everything is computed before the first file is written; each file is written atomically.
    """
    output_dir = Path(output_dir)
    photo = read_image(bundled_photo_path())
    annotation = read_annotation(bundled_annotation_path())
    coarse = annotation.labels
    unknown = coarse == annotation.unknown_label
    # The first call in a fresh environment compiles the CPU kernels (numba, cached on disk afterwards): do it on a
    # tiny crop, so that the refinement's time below is the refinement's.
    start = time.perf_counter()
    refine(
        photo[:8, :8],
        labels=coarse[:8, :8],
        num_classes=len(DEMO_CLASSES),
        unknown_label=annotation.unknown_label,
        num_iterations=1,
        device=device,
    )
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    refined = refine(
        photo,
        labels=coarse,
        num_classes=len(DEMO_CLASSES),
        unknown_label=annotation.unknown_label,
        num_iterations=num_iterations,
        device=device,
    )
    seconds = time.perf_counter() - start
    logger.info("refined a %dx%d annotation in %.2f s", photo.shape[1], photo.shape[0], seconds)

    colors = annotation.colors().copy()
    colors[annotation.unknown_label] = UNKNOWN_COLOR
    legend = [(name, tuple(colors[k])) for k, name in enumerate(DEMO_CLASSES)] + [("unknown", UNKNOWN_COLOR)]
    figure = figure_with_legend(
        [photo, colors[coarse], colors[refined]],
        ["photo", "coarse annotation (input)", f"refined ({num_iterations} mean-field iterations)"],
        legend,
    )
    blend = overlay(photo, refined, colors)
    files = [output_dir / "output.png", output_dir / "overlay.png", output_dir / "comparison.png"]
    save_annotation(annotation, refined, files[0])
    save_image(blend, files[1])
    save_image(figure, files[2])
    changed = int((refined[~unknown] != coarse[~unknown]).sum())
    return DemoResult(
        output_dir, files, changed, int((~unknown).sum()), int(unknown.sum()), int(coarse.size), seconds, warmup
    )
