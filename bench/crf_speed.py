"""Speed and memory benchmark of the CRF-RNN layer against pydensecrf (a benchmark, not a test).

Runs 10 mean-field iterations with 21 classes on the bundled photograph (centre-cropped to 4:3, 500x375) and prints our
forward, forward+backward, the peer's construction+inference, the scaling to 1000x750 and the peak memory of a forward.
The layer starts from the Potts initialisation, as a fresh layer does; the rows "full matrices" perturb every entry of
the three (C, C) matrices, as training does, which replaces per-class scales by matrix products.

    python bench/crf_speed.py [--repeats 5] [--threads N] [--no-peer] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO = Path(__file__).resolve().parents[1] / "src" / "crfasrnn" / "data" / "astronaut.jpg"
NUM_CLASSES, NUM_ITERATIONS = 21, 10
KERNEL = {"theta_alpha": 160.0, "theta_beta": 3.0, "theta_gamma": 3.0, "spatial_weight": 3.0, "bilateral_weight": 5.0}
SIZE, LARGE = (500, 375), (1000, 750)  # (width, height)
TARGETS = {"fwd_vs_peer": 0.5, "fwdbwd_vs_fwd": 2.5, "scale_2x": 4.5, "peak_mb": 400.0}


def load_photo(size: tuple[int, int], path: Path = PHOTO) -> np.ndarray:
    """The photo centre-cropped to 4:3 and resized (bilinear) to ``size`` = (W, H): (H, W, 3) uint8, C-contiguous."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    cw, ch = min(w, h * 4 // 3), min(h, w * 3 // 4)
    left, top = (w - cw) // 2, (h - ch) // 2
    im = im.crop((left, top, left + cw, top + ch)).resize(size, Image.BILINEAR)
    return np.ascontiguousarray(np.array(im, dtype=np.uint8))  # writable: pydensecrf needs that


def make_unary(height: int, width: int) -> np.ndarray:
    """Deterministic smooth logits (C, H, W) float32: a coarse random 12x16 map per class, upsampled bilinearly."""
    import torch
    import torch.nn.functional as F

    coarse = np.random.RandomState(0).randn(1, NUM_CLASSES, 12, 16).astype(np.float32) * 3.0
    up = F.interpolate(torch.from_numpy(coarse), size=(height, width), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(up[0].numpy(), dtype=np.float32)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def setup_ours(size: tuple[int, int], device: str):
    """Our layer and its (1, C, H, W) unary and (1, 3, H, W) 0..255 image tensors on ``device``."""
    import torch

    import crfasrnn

    w, h = size
    crf = crfasrnn.CrfRnn(NUM_CLASSES, num_iterations=NUM_ITERATIONS, **KERNEL).to(device)
    unary = torch.from_numpy(make_unary(h, w))[None].to(device)
    image = torch.from_numpy(load_photo(size)).permute(2, 0, 1)[None].float().contiguous().to(device)
    return crf, unary, image


def _runners(size, device: str, dense: bool):
    """Our forward (no gradient) and forward+backward on the same inputs, as two functions to time.

    ``dense``: full (non-diagonal) kernel-weight and compatibility matrices, as after training, instead of the Potts
    initialisation (which inference runs as per-class scales, like pydensecrf's Potts compatibility).
    """
    import torch

    crf, unary, image = setup_ours(size, device)
    if dense:
        with torch.no_grad():
            for p in crf.parameters():
                p.add_(0.05 * torch.from_numpy(np.random.RandomState(2).rand(*p.shape).astype(np.float32)).to(device))
    grad_out = torch.from_numpy(np.random.RandomState(1).randn(*unary.shape).astype(np.float32)).to(device)

    def forward():
        with torch.no_grad():
            crf(unary, image)

    def forward_backward():
        u = unary.clone().requires_grad_(True)
        (crf(u, image) * grad_out).sum().backward()

    return forward, forward_backward


def bench_ours(size, device: str, repeats: int, backward: bool, dense: bool = False) -> tuple[float, list[float]]:
    """(first-call seconds, list of timed seconds) for our forward, or forward+backward (``dense``: see _runners)."""
    fn = _runners(size, device, dense)[1 if backward else 0]
    first = timed(fn, device)  # also the warm-up: includes any JIT compilation
    return first, [timed(fn, device) for _ in range(repeats)]


def backward_pairs(size, device: str, repeats: int, dense: bool = False) -> list[float]:
    """Ratios of our forward+backward to our forward, the two alternated run by run (as with the peer), so that both
    see the same machine load: the median of the pair ratios is steadier than a ratio of two medians taken minutes
    apart on a machine whose speed drifts."""
    forward, forward_backward = _runners(size, device, dense)
    forward()
    forward_backward()
    return [timed(forward_backward, device) / timed(forward, device) for _ in range(repeats)]


def scale_pairs(device: str, repeats: int) -> list[float]:
    """Ratios of our forward at LARGE to our forward at SIZE, the two alternated run by run (see backward_pairs)."""
    small, large = _runners(SIZE, device, False)[0], _runners(LARGE, device, False)[0]
    small()
    large()
    return [timed(large, device) / timed(small, device) for _ in range(repeats)]


def bench_paired(size, device: str, repeats: int) -> tuple[list[float], list[float]]:
    """Our forward and the peer's, alternated run by run so that both see the same machine load.

    Returns (our seconds, peer seconds), one pair per repeat; the headline ratio is the median of the pair ratios.
    """
    import torch

    crf, unary, image = setup_ours(size, device)
    peer = peer_runner(size)

    def ours():
        with torch.no_grad():
            crf(unary, image)

    ours()
    peer()
    pairs = [(timed(ours, device), timed(peer, "cpu")) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def single_thread_pairs(size, repeats: int) -> list[float]:
    """Ratios of our CPU forward on one thread to the peer's, alternated: the per-core cost, whatever the core count."""
    import numba
    import torch

    before = (torch.get_num_threads(), numba.get_num_threads())
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        ours, peer = bench_paired(size, "cpu", repeats)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
    return [a / b for a, b in zip(ours, peer)]


def peer_runner(size):
    """pydensecrf's DenseCRF2D construction + pairwise set-up + inference, same settings, as a callable."""
    import pydensecrf.densecrf as dcrf

    w, h = size
    image = load_photo(size)
    energy = np.ascontiguousarray(-make_unary(h, w).reshape(NUM_CLASSES, -1), dtype=np.float32)

    def run():
        d = dcrf.DenseCRF2D(w, h, NUM_CLASSES)
        d.setUnaryEnergy(energy)
        d.addPairwiseGaussian(sxy=KERNEL["theta_gamma"], compat=KERNEL["spatial_weight"])
        d.addPairwiseBilateral(
            sxy=KERNEL["theta_alpha"], srgb=KERNEL["theta_beta"], rgbim=image, compat=KERNEL["bilateral_weight"]
        )
        d.inference(NUM_ITERATIONS)

    return run


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(mode: str, device: str) -> dict:
    """In a fresh process: peak resident memory of one 500x375 forward above the RSS just before it, in MB.

    The peak is VmHWM after resetting it through /proc/self/clear_refs: ``ru_maxrss`` alone is not usable in a
    subprocess on Linux, where it starts at the parent's peak (exec after vfork keeps the old high-water mark).
    Where /proc is missing the ``ru_maxrss`` figure is used.
    """
    import resource

    import torch

    crf, unary, image = setup_ours((64, 48), device)  # small warm-up: loads/compiles the kernels
    crf(unary.requires_grad_(True), image).sum().backward()
    crf, unary, image = setup_ours(SIZE, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark
        use_proc = _proc_status_kb("VmHWM") is not None
    except OSError:
        use_proc = False
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    before = _proc_status_kb("VmRSS") * 1024 if use_proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    with torch.set_grad_enabled(mode != "no_grad"):
        out = crf(unary.requires_grad_(mode != "no_grad"), image)
        if mode == "fwd_bwd":
            out.sum().backward()
    sync(device)
    peak = _proc_status_kb("VmHWM") * 1024 if use_proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    result = {"peak_rss_mb": (peak - before) / 2**20, "method": "VmHWM" if use_proc else "ru_maxrss"}
    if device == "cuda":
        result["peak_gpu_mb"] = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20
    return result


def measure_memory(mode: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", mode, "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_cold_start(args) -> float | None:
    """Seconds of the first forward in a fresh process with an empty numba cache: what a new environment pays once."""
    if args.device != "cpu":
        return None
    code = (
        "import sys, time, torch; sys.path.insert(0, sys.argv[1]); import crf_speed as b; "
        "crf, u, im = b.setup_ours(b.SIZE, 'cpu'); t = time.perf_counter(); "
        "torch.no_grad().__enter__(); crf(u, im); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        proc = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).resolve().parent)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch and numba threads (default: library default)")
    parser.add_argument("--no-peer", action="store_true", help="skip pydensecrf")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    parser.add_argument("--memory-child", choices=("no_grad", "grad", "fwd_bwd"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # before crfasrnn imports numba; children inherit it

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.device)))
        return
    try:
        import crfasrnn
    except ImportError as exc:
        sys.exit(f"crfasrnn is not importable ({exc}): install the package first (pip install -e .)")

    numba = getattr(getattr(crfasrnn, "lattice", None), "numba_available", lambda: False)()
    r: dict = {
        "size": list(SIZE),
        "classes": NUM_CLASSES,
        "iterations": NUM_ITERATIONS,
        "device": args.device,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_available": numba,
        "crfasrnn": getattr(crfasrnn, "__version__", "?"),
    }
    print(
        f"CRF-RNN benchmark: {SIZE[0]}x{SIZE[1]}, {NUM_CLASSES} classes, {NUM_ITERATIONS} iterations, "
        f"device {args.device}, {args.repeats} repeats",
        flush=True,
    )
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.2f} before the start: other processes may skew the timings")

    r["fwd_first_s"], r["fwd_runs_s"] = bench_ours(SIZE, args.device, args.repeats, backward=False)
    r["fwdbwd_first_s"], r["fwdbwd_runs_s"] = bench_ours(SIZE, args.device, args.repeats, backward=True)
    r["fwd_dense_first_s"], r["fwd_dense_runs_s"] = bench_ours(SIZE, args.device, args.repeats, False, dense=True)
    r["fwdbwd_dense_first_s"], r["fwdbwd_dense_runs_s"] = bench_ours(SIZE, args.device, args.repeats, True, dense=True)
    r["fwd_large_first_s"], r["fwd_large_runs_s"] = bench_ours(LARGE, args.device, args.repeats, backward=False)
    for key in ("fwd", "fwdbwd", "fwd_dense", "fwdbwd_dense", "fwd_large"):
        r[f"{key}_s"] = statistics.median(r[f"{key}_runs_s"])
    r["peer_s"] = None
    if args.no_peer:
        print("note: --no-peer given, pydensecrf skipped")
    else:
        try:
            r["paired_ours_s"], r["peer_runs_s"] = bench_paired(SIZE, args.device, args.repeats)
            r["peer_s"] = statistics.median(r["peer_runs_s"])
            r["ratio_paired"] = statistics.median(a / b for a, b in zip(r["paired_ours_s"], r["peer_runs_s"]))
            if args.device == "cpu" and numba:
                r["ratio_single_thread"] = statistics.median(single_thread_pairs(SIZE, args.repeats))
        except ImportError as exc:
            print(f"note: pydensecrf not importable ({exc}); peer skipped (make bench-setup installs it)")
    for mode in ("no_grad", "grad", "fwd_bwd"):
        r[f"mem_{mode}"] = measure_memory(mode, args)
    r["cold_first_s"] = measure_cold_start(args)

    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    r["ratio_fwd_vs_peer"] = r.get("ratio_paired")
    r["ratio_fwd_dense_vs_peer"] = ratio(r["fwd_dense_s"], r["peer_s"])
    r["ratio_fwdbwd_vs_fwd"] = statistics.median(backward_pairs(SIZE, args.device, args.repeats))
    r["ratio_fwdbwd_dense_vs_fwd_dense"] = statistics.median(backward_pairs(SIZE, args.device, args.repeats, True))
    r["ratio_scale_2x"] = statistics.median(scale_pairs(args.device, args.repeats))

    def row(name, value, unit="s", target=None, lower=True):
        shown = "n/a" if value is None else (f"{value:.3f} {unit}" if unit else f"{value:.2f}")
        verdict = (
            ""
            if target is None or value is None
            else ("ok" if (value <= target if lower else value < target) else "MISSED")
        )
        goal = "" if target is None else f"{'<=' if lower else '<'} {target:g}"
        print(f"  {name:<44}{shown:>14}   {goal:<8} {verdict}")

    print(f"\n  {'figure':<44}{'value':>14}   {'target':<8} verdict")
    row("ours forward, first call, empty JIT cache", r["cold_first_s"])
    row("ours forward, first call, cached kernels", r["fwd_first_s"])
    row("ours forward (no_grad, median)", r["fwd_s"])
    row("ours forward+backward (median)", r["fwdbwd_s"])
    row("ours forward, full C×C matrices (median)", r["fwd_dense_s"])
    row("ours forward+backward, full matrices (median)", r["fwdbwd_dense_s"])
    row(f"ours forward {LARGE[0]}x{LARGE[1]} (median)", r["fwd_large_s"])
    row("pydensecrf construct+inference (median)", r["peer_s"])
    row("ratio ours fwd / pydensecrf (paired runs)", r["ratio_fwd_vs_peer"], "", TARGETS["fwd_vs_peer"])
    row("ratio ours fwd on 1 thread / pydensecrf", r.get("ratio_single_thread"), "")
    row("ratio ours fwd (full matrices) / pydensecrf", r["ratio_fwd_dense_vs_peer"], "")
    row("ratio fwd+bwd / fwd (paired runs)", r["ratio_fwdbwd_vs_fwd"], "", TARGETS["fwdbwd_vs_fwd"])
    row("the same, both with full matrices", r["ratio_fwdbwd_dense_vs_fwd_dense"], "")
    row(
        f"ratio {LARGE[0]}x{LARGE[1]} / {SIZE[0]}x{SIZE[1]} forward (paired)",
        r["ratio_scale_2x"],
        "",
        TARGETS["scale_2x"],
    )
    for mode, label in (("no_grad", "no_grad"), ("grad", "grad enabled"), ("fwd_bwd", "fwd+bwd")):
        target = TARGETS["peak_mb"] if mode != "fwd_bwd" else None  # the target is for the forward
        row(f"peak RSS above baseline, {label}", r[f"mem_{mode}"]["peak_rss_mb"], "MB", target, False)
        if "peak_gpu_mb" in r[f"mem_{mode}"]:
            row(f"peak GPU memory, {label}", r[f"mem_{mode}"]["peak_gpu_mb"], "MB")
    print(
        f"\n  torch {r['torch']}, {r['torch_threads']} threads; numba available: {numba}"
        f"{', NUMBA_NUM_THREADS=' + os.environ['NUMBA_NUM_THREADS'] if 'NUMBA_NUM_THREADS' in os.environ else ''}; "
        f"memory measured with {r['mem_no_grad']['method']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"  figures written to {args.json}")


if __name__ == "__main__":
    main()
