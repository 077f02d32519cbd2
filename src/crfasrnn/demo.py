"""The demonstration: dense-CRF refinement of a blocky, coarse segmentation of the bundled photograph.

No trained weights are needed: the coarse segmentation is made by clustering the colours of 16×16 blocks of the photo
(what a low-resolution segmentation network gives: the right regions, boundaries on a block grid), and the CRF-RNN layer
moves the boundaries onto the image edges.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .crf import CrfRnn
from .image import bundled_photo_path, colorize, read_image, save_image, save_label_map, side_by_side

__all__ = ["coarse_block_labels", "run_demo", "DemoResult"]

logger = logging.getLogger(__name__)


def coarse_block_labels(image: np.ndarray, *, block: int = 16, num_clusters: int = 5, iterations: int = 20) -> np.ndarray:
    """A blocky label map: k-means over the mean colours of ``block``×``block`` tiles, upsampled by repetition.

    Deterministic (the centres start at colour quantiles of the tiles' brightness).

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) int64 labels in 0..num_clusters-1.
    """
    h, w, _ = image.shape
    th, tw = -(-h // block), -(-w // block)
    padded = np.pad(image.astype(np.float64), ((0, th * block - h), (0, tw * block - w), (0, 0)), mode="edge")
    tiles = padded.reshape(th, block, tw, block, 3).mean(axis=(1, 3)).reshape(-1, 3)
    order = np.argsort(tiles.sum(axis=1), kind="stable")
    centres = tiles[order[np.linspace(0, len(order) - 1, num_clusters).round().astype(int)]].copy()
    for _ in range(iterations):
        assign = ((tiles[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        for k in range(num_clusters):
            if np.any(assign == k):
                centres[k] = tiles[assign == k].mean(axis=0)
    labels = assign.reshape(th, tw).repeat(block, axis=0).repeat(block, axis=1)
    return labels[:h, :w]


@dataclass
class DemoResult:
    output_dir: Path
    files: list[Path]
    changed_pixels: int
    total_pixels: int
    seconds: float


def run_demo(output_dir: str | Path, *, num_iterations: int = 10, device: str = "cpu") -> DemoResult:
    """Refine the coarse block segmentation of the bundled photo and write the figures.

    Writes ``output.png`` (refined labels, VOC palette), ``coarse.png`` and ``comparison.png`` (photo | coarse | refined).
    """
    output_dir = Path(output_dir)
    photo = read_image(bundled_photo_path())
    coarse = coarse_block_labels(photo)
    num_classes = int(coarse.max()) + 1
    prob = np.full((num_classes,) + coarse.shape, 0.4 / (num_classes - 1), dtype=np.float32)
    np.put_along_axis(prob, coarse[None], 0.6, axis=0)
    unary = torch.from_numpy(np.log(prob))[None].to(device)
    image = torch.from_numpy(photo.astype(np.float32)).permute(2, 0, 1)[None].to(device)
    crf = CrfRnn(
        num_classes, num_iterations, theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0,
        spatial_weight=3.0, bilateral_weight=10.0,
    ).to(device)
    start = time.perf_counter()
    with torch.no_grad():
        refined = crf(unary, image).argmax(dim=1)[0].cpu().numpy()
    seconds = time.perf_counter() - start
    logger.info("refined a %dx%d image with %d classes in %.2f s", photo.shape[1], photo.shape[0], num_classes, seconds)
    files = [output_dir / "output.png", output_dir / "coarse.png", output_dir / "comparison.png"]
    save_label_map(refined, files[0])
    save_label_map(coarse, files[1])
    save_image(side_by_side(photo, colorize(coarse), colorize(refined)), files[2])
    return DemoResult(output_dir, files, int((refined != coarse).sum()), int(coarse.size), seconds)
