"""Cost of the higher-order potentials per mean-field iteration, as a fraction of the pairwise term (a benchmark).

The setting of Arnab et al. (ECCV 2016) on PASCAL VOC: one 500x375 photo (``bench/crf_speed.py``'s), 21 classes, 20
detections (random boxes of 10-60 % of each side, random labels and scores) and 3 SLIC superpixel scales (100, 200
and 400 segments). Per iteration, the CRF-RNN layer filters the marginals through its two lattices (the pairwise
term; the lattices themselves are built once per forward and are not counted); the potentials add:

* detection: :func:`crfasrnn.higher_order.detection_update` (Y's update and the pixels' term), every iteration;
* superpixel, caffe-tvg's form (the default): :func:`~crfasrnn.higher_order.superpixel_mean_term` once per forward
  (its cost is shown whole and divided by the iterations), then one addition per iteration;
* superpixel, the paper's Pⁿ-Potts form: :func:`~crfasrnn.higher_order.superpixel_potts_term`, every iteration.

Each timed function runs once as a warm-up; then every repeat runs all of them in turn (so that the ratios of a
repeat see the same machine load), and the headline is the median of the per-repeat ratios. The whole layer, forward
and backward with 5 iterations, with and without both potentials, is timed the same way. SLIC itself (preprocessing,
scikit-image) is timed once.

    python bench/higher_order_speed.py [--repeats 7] [--iterations 5] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crf_speed import load_photo, timed

HEIGHT, WIDTH, NUM_CLASSES, NUM_DETECTIONS = 375, 500, 21, 20
SUPERPIXELS = (100, 200, 400)


def setting(device: str):
    """The photo (H, W, 3) uint8, unary (1, C, H, W), detections and superpixels, seeded; and SLIC's time."""
    import numpy as np
    import torch

    from crfasrnn.higher_order import Detections, slic_superpixels

    photo = load_photo((WIDTH, HEIGHT))  # the main benchmark's photo (bench/crf_speed.py)
    gen = torch.Generator().manual_seed(0)
    unary = torch.randn(1, NUM_CLASSES, HEIGHT, WIDTH, generator=gen) * 3
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(NUM_DETECTIONS):
        w, h = rng.uniform(0.1, 0.6) * WIDTH, rng.uniform(0.1, 0.6) * HEIGHT
        x0, y0 = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        boxes.append((x0, y0, x0 + w, y0 + h))
    labels = rng.integers(1, NUM_CLASSES, NUM_DETECTIONS).tolist()
    scores = rng.uniform(0.3, 1.0, NUM_DETECTIONS).tolist()
    detections = Detections.from_boxes([boxes], [labels], [scores], size=(HEIGHT, WIDTH)).to(device)
    start = time.perf_counter()
    superpixels = slic_superpixels(photo, SUPERPIXELS).to(device)
    slic_seconds = time.perf_counter() - start
    return photo, unary.to(device), detections, superpixels, slic_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    from crfasrnn import CrfRnn
    from crfasrnn.crf import bilateral_features
    from crfasrnn.engine import kernel_lattice, position_lattice_tensors
    from crfasrnn.higher_order import (
        detection_update,
        detection_y_init,
        superpixel_mean_term,
        superpixel_potts_term,
    )
    from crfasrnn.lattice import NORMALIZE_AFTER, mode_scales, resolve_backend

    device = args.device
    photo, unary, detections, superpixels, slic_seconds = setting(device)
    image = torch.from_numpy(photo.transpose(2, 0, 1).copy()).float()[None].to(device)
    n = HEIGHT * WIDTH
    layer = CrfRnn(NUM_CLASSES, args.iterations, detections=True, superpixel_scales=3).to(device)
    plain = CrfRnn(NUM_CLASSES, args.iterations).to(device)
    backend = resolve_backend("auto", unary.device)
    with torch.no_grad():
        features = bilateral_features(image, layer.theta_alpha, layer.theta_beta)
        bilateral = kernel_lattice("bilateral", features, 1, (HEIGHT, WIDTH), torch.float32, backend)
        spatial = position_lattice_tensors(
            (HEIGHT, WIDTH), layer.theta_gamma, None, unary.device, torch.float32, backend
        )
        m = layer.compatibility
        mixing = [(m @ layer.spatial_weights).t().contiguous(), (m @ layer.bilateral_weights).t().contiguous()]
        u = unary.reshape(1, NUM_CLASSES, n).transpose(1, 2).contiguous()
        probs = torch.softmax(u, dim=-1)
        log_probs = torch.log_softmax(u, dim=-1)
        masks = detections.masks.reshape(1, NUM_DETECTIONS, n).transpose(1, 2).float().contiguous()
        y0 = detection_y_init(detections.scores, 1.0, 1e-4)
        segments = superpixels.segments.reshape(1, 3, n)
        ho = layer.higher_order
        gamma = torch.ones(3, NUM_CLASSES, device=device)

    pre, post = mode_scales(NORMALIZE_AFTER)

    def pairwise():  # what an iteration of the layer filters: Σ_k (n_k ⊙ K_k p) A_k
        with torch.no_grad():
            sum(
                torch.ops.crfasrnn.lattice_filter(probs, list(lattice), False, pre, post) @ a
                for lattice, a in zip((spatial, bilateral), mixing)
            )

    def detection():
        with torch.no_grad():
            detection_update(
                probs,
                y0,
                y0,
                detections.labels,
                detections.scores,
                masks,
                ho.detection_x_weights,
                ho.detection_y_weights,
            )

    def superpixel_mean():
        with torch.no_grad():
            superpixel_mean_term(u, segments, superpixels.num_segments, ho.superpixel_weights)

    def superpixel_potts():
        with torch.no_grad():
            superpixel_potts_term(log_probs, segments, superpixels.num_segments, gamma)

    def layer_plain():
        x = unary.detach().requires_grad_(True)
        plain(x, image).square().mean().backward()

    def layer_higher():
        x = unary.detach().requires_grad_(True)
        layer(x, image, detections, superpixels).square().mean().backward()

    terms = {
        "pairwise": pairwise,
        "detection": detection,
        "superpixel_mean": superpixel_mean,
        "superpixel_potts": superpixel_potts,
        "layer_plain": layer_plain,
        "layer_higher_order": layer_higher,
    }
    for fn in terms.values():  # warm-up (numba compilation, allocator)
        fn()
    times: dict[str, list[float]] = {name: [] for name in terms}
    for _ in range(args.repeats):
        for name, fn in terms.items():
            times[name].append(timed(fn, device))
    t = args.iterations
    ratios = {
        "detection / pairwise (per iteration)": [d / p for d, p in zip(times["detection"], times["pairwise"])],
        "superpixel mean / pairwise (once per forward)": [
            s / p for s, p in zip(times["superpixel_mean"], times["pairwise"])
        ],
        f"superpixel mean / pairwise (per iteration, over {t})": [
            s / t / p for s, p in zip(times["superpixel_mean"], times["pairwise"])
        ],
        "superpixel Pn-Potts / pairwise (per iteration)": [
            s / p for s, p in zip(times["superpixel_potts"], times["pairwise"])
        ],
        f"layer with both / plain layer (forward+backward, T={t})": [
            h / p for h, p in zip(times["layer_higher_order"], times["layer_plain"])
        ],
    }
    medians = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"{WIDTH}x{HEIGHT}, {NUM_CLASSES} classes, {NUM_DETECTIONS} detections, superpixels {SUPERPIXELS}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for name, value in medians.items():
        print(f"  {name:<22} {value * 1000:9.2f} ms (median)")
    print(f"  SLIC, 3 scales (once)  {slic_seconds * 1000:9.2f} ms")
    for name, values in ratios.items():
        print(f"  {name:<58} {statistics.median(values):7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "medians_s": medians,
                    "slic_s": slic_seconds,
                    "ratios": {k: statistics.median(v) for k, v in ratios.items()},
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
