"""Speed of the dense-CRF loss against the network it trains (a benchmark, not a test).

Times the loss + gradient of :class:`crfasrnn.losses.DenseCRFLoss` (forward and backward with respect to the
segmentation) on a batch of 8 at 321x321 (rloss's crop size), 21 classes, sigma_rgb 15, sigma_xy 100, at
scale_factor 0.5 (the paper's) and 1.0, and expresses each as a fraction of one forward+backward of the network at
that size. The network term is the FCN-8s backbone alone (``crfasrnn.models.FCN8s``, in training mode), as a
weakly-supervised training step runs it: there the loss takes the place of the CRF layer of ``CrfRnnNet``.

Inputs: random images in 0..255, the softmax of random logits, a ROI of ones; the network takes the same images
mean-subtracted in BGR order (as ``crfasrnn.transforms.preprocess`` gives them) and is backpropagated from a fixed
random gradient on its logits. Each timed function runs once as a warm-up; then each repeat runs, in turn, the loss
at 0.5, the network, and the loss at 1.0, so that the two ratios of a repeat see the same machine load, and the
median of the per-repeat ratios is the headline (beside the absolute medians). Peak memory is the resident memory
(VmHWM, reset through /proc/self/clear_refs) above that just before each call, the largest over its calls (the
warm-up included; on CUDA the peak allocated GPU memory as well). It resets the process's high-water mark, so an outer
``/usr/bin/time``'s maximum resident size is not the run's peak.

    python bench/loss_speed.py [--repeats 5] [--width 1.0] [--threads N] [--device cpu|cuda] [--json OUT]

``--width 1`` is the published FCN-8s (134 M parameters); a forward+backward of a batch of 8 takes about 20 s on 2
idle CPU cores (and about 4 GB of memory; 40 s and more when other processes share the cores), so a default run takes
2-5 minutes there; ``--width 0.25 --repeats 3`` is a quick run (under half a minute; its network term is smaller, so
its ratios are larger).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crf_speed import _proc_status_kb, sync

BATCH, SIZE, NUM_CLASSES = 8, 321, 21  # rloss's batch and crop size (square), PASCAL VOC's labels
SIGMA_RGB, SIGMA_XY, WEIGHT = 15.0, 100.0, 2e-9  # the paper's; the weight changes no timing
SCALES = (0.5, 1.0)


def _reset_peak() -> bool:
    """Reset the peak-RSS high-water mark (VmHWM); False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


class Timer:
    """Times calls (synchronising CUDA around them) and keeps the peak memory above the start of each call."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}

    def __call__(self, name: str, fn) -> float:
        import torch

        gc.collect()
        sync(self.device)
        proc = _reset_peak()
        before = _proc_status_kb("VmRSS") if proc else None
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            gpu_before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        sync(self.device)
        elapsed = time.perf_counter() - start
        if proc and before is not None:
            peak = (_proc_status_kb("VmHWM") - before) / 1024
            self.peak_rss_mb[name] = max(peak, self.peak_rss_mb.get(name, 0.0))
        if self.device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20
            self.peak_gpu_mb[name] = max(peak, self.peak_gpu_mb.get(name, 0.0))
        return elapsed


def make_inputs(device: str):
    """(images (N, 3, H, W) in 0..255, probabilities (N, K, H, W), ROI (N, H, W) of ones, network input), seeded."""
    import torch

    from crfasrnn import VOC_MEAN_RGB

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=gen).float()
    logits = torch.randn(BATCH, NUM_CLASSES, SIZE, SIZE, generator=gen) * 3.0
    probs = torch.softmax(logits, dim=1)
    rois = torch.ones(BATCH, SIZE, SIZE)
    mean = torch.tensor(VOC_MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
    net_input = (images - mean).flip(1).contiguous()  # RGB - mean, then BGR: the network's preprocessing
    return images.to(device), probs.to(device), rois.to(device), net_input.to(device)


def loss_runner(scale: float, images, probs, rois):
    """One loss + gradient with respect to the segmentation at ``scale``, as a function to time."""
    from crfasrnn.losses import DenseCRFLoss

    loss_fn = DenseCRFLoss(weight=WEIGHT, sigma_rgb=SIGMA_RGB, sigma_xy=SIGMA_XY, scale_factor=scale)

    def run():
        seg = probs.detach().requires_grad_(True)  # a fresh leaf: no gradient accumulation from call to call
        loss_fn(images, seg, rois).backward()

    return run


def network_runner(width: float, net_input, device: str):
    """One forward+backward of FCN-8s (training mode, gradients reset to None first) and its parameter count."""
    import torch

    from crfasrnn.models import FCN8s

    torch.manual_seed(0)
    net = FCN8s(NUM_CLASSES, width=width).to(device).train()
    grad_out = torch.randn(BATCH, NUM_CLASSES, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(device)

    def run():
        net.zero_grad(set_to_none=True)
        net(net_input).backward(grad_out)

    return run, sum(p.numel() for p in net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after the warm-up (median reported)")
    parser.add_argument("--width", type=float, default=1.0, help="FCN-8s channel width (1.0: the published network)")
    parser.add_argument("--threads", type=int, default=0, help="torch and numba threads (default: library default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not args.width > 0:
        parser.error("--width must be > 0")
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # before crfasrnn imports numba

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch sees no CUDA device")
    try:
        import crfasrnn
    except ImportError as exc:
        sys.exit(f"crfasrnn is not importable ({exc}): install the package first (pip install -e .)")

    numba = getattr(getattr(crfasrnn, "lattice", None), "numba_available", lambda: False)()
    print(
        f"dense-CRF loss benchmark: batch {BATCH}, {SIZE}x{SIZE}, {NUM_CLASSES} classes, sigma_rgb {SIGMA_RGB:g}, "
        f"sigma_xy {SIGMA_XY:g}, scale_factor {' and '.join(f'{s}' for s in SCALES)}; network FCN-8s width "
        f"{args.width:g}, batch {BATCH}; device {args.device}, {args.repeats} repeats",
        flush=True,
    )
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.2f} before the start: other processes may skew the timings")

    images, probs, rois, net_input = make_inputs(args.device)
    losses = {s: loss_runner(s, images, probs, rois) for s in SCALES}
    network, params = network_runner(args.width, net_input, args.device)
    timer = Timer(args.device)
    names = {s: f"loss_{s}" for s in SCALES}

    # loss 0.5, network, loss 1.0 in turn: the two ratios of a repeat each from neighbouring calls
    order = [(names[SCALES[0]], losses[SCALES[0]]), ("network", network), (names[SCALES[1]], losses[SCALES[1]])]
    first = {name: timer(name, fn) for name, fn in order}  # warm-ups: JIT, allocator and oneDNN caches
    runs: dict[str, list[float]] = {name: [] for name, _ in order}
    start = time.perf_counter()
    for _ in range(args.repeats):
        for name, fn in order:
            runs[name].append(timer(name, fn))
        print(
            "  repeat " + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in runs.items()),
            flush=True,
        )
    timed_s = time.perf_counter() - start

    r: dict = {
        "batch": BATCH,
        "size": [SIZE, SIZE],
        "classes": NUM_CLASSES,
        "sigma_rgb": SIGMA_RGB,
        "sigma_xy": SIGMA_XY,
        "scales": list(SCALES),
        "width": args.width,
        "network_parameters": params,
        "device": args.device,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_available": numba,
        "crfasrnn": getattr(crfasrnn, "__version__", "?"),
        "first_s": first,
        "runs_s": runs,
        "median_s": {name: statistics.median(values) for name, values in runs.items()},
        "ratios": {},
        "ratio_vs_network": {},
        "peak_rss_mb": timer.peak_rss_mb,
        "timed_loop_s": timed_s,
    }
    if timer.peak_gpu_mb:
        r["peak_gpu_mb"] = timer.peak_gpu_mb
    for s in SCALES:
        ratios = [a / b for a, b in zip(runs[names[s]], runs["network"])]
        r["ratios"][names[s]] = ratios
        r["ratio_vs_network"][names[s]] = statistics.median(ratios)

    def row(name, value, unit="s"):
        shown = "n/a" if value is None else (f"{value:.3f} {unit}" if unit else f"{value:.4f}")
        print(f"  {name:<56}{shown:>14}")

    print(f"\n  {'figure':<56}{'value':>14}")
    for s in SCALES:
        row(f"loss+grad, scale_factor {s}, first call", first[names[s]])
    row(f"network fwd+bwd (FCN-8s width {args.width:g}), first call", first["network"])
    for s in SCALES:
        row(f"loss+grad, scale_factor {s} (median)", r["median_s"][names[s]])
    row(f"network fwd+bwd (FCN-8s width {args.width:g}, median)", r["median_s"]["network"])
    for s in SCALES:
        pairs = ", ".join(f"{x:.4f}" for x in r["ratios"][names[s]])
        row(f"loss {s} / network (median of pairs)", r["ratio_vs_network"][names[s]], "")
        print(f"  {'':<4}pairs: {pairs}")
    for s in SCALES:
        row(f"ratio of medians, loss {s} / network", r["median_s"][names[s]] / r["median_s"]["network"], "")
    for name in runs:
        label = name.replace("_", " scale_factor ") if name != "network" else "network fwd+bwd"
        row(f"peak RSS above the call's start, {label}", timer.peak_rss_mb.get(name), "MB")
        if name in timer.peak_gpu_mb:
            row(f"peak GPU memory above the call's start, {label}", timer.peak_gpu_mb[name], "MB")
    print(
        f"\n  FCN-8s width {args.width:g}: {params / 1e6:.1f} M parameters, batch {BATCH} (as the loss); "
        f"torch {r['torch']}, {r['torch_threads']} threads; numba available: {numba}"
        f"{', NUMBA_NUM_THREADS=' + os.environ['NUMBA_NUM_THREADS'] if 'NUMBA_NUM_THREADS' in os.environ else ''}; "
        f"memory measured with {'VmHWM' if timer.peak_rss_mb else 'nothing (no /proc)'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"  figures written to {args.json}")


if __name__ == "__main__":
    main()
