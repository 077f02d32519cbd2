"""The pydensecrf drop-in (``crfasrnn.densecrf``) against pydensecrf2 on the same programs (a benchmark, not a test).

Two programs, each run by both libraries through the same code (only the module differs), timed in alternated pairs
(peer, ours) after a warm-up; the medians and the median of the per-pair ratios are printed:

* ``image``: the classic post-processing pipeline on the bundled photograph (centre-cropped to 4:3, 500x375), 21 labels,
  5 iterations, a Gaussian (sxy 3, compat 3) and a bilateral kernel (sxy 80, srgb 13, compat 10); everything from
  ``DenseCRF2D(...)`` to the label map ``np.argmax(Q, axis=0)`` is timed (the output included);
* ``volume``: a 128x128x128 volume with one intensity channel, 2 labels, 5 iterations, through the generic
  ``DenseCRF`` with a 3-D Gaussian kernel and a bilateral kernel over the 4-D features of ``utils`` (3 positions and
  the intensity), the features made outside the timing (the same arrays for both).

Peak memory: each program once in a fresh process per library (the peak resident memory above the process's memory just
before the program, from VmHWM).

    python bench/densecrf_speed.py [--repeats 5] [--only image|volume] [--no-memory] [--json OUT]

Targets (issue #13): ours / peer <= 0.5 on both, and on the volume no more peak memory than the peer.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crf_speed import _proc_status_kb, load_photo

VOLUME = (128, 128, 128)
TARGETS = {"image": 0.5, "volume": 0.5}


def _smooth_probs(shape: tuple[int, ...], classes: int, seed: int = 0) -> np.ndarray:
    """Deterministic smooth class probabilities: coarse random logits upsampled (nearest, then box-averaged)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(np.random.RandomState(seed).randn(1, classes, *[max(2, s // 32) for s in shape]) * 3)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    logits = F.interpolate(coarse.float(), size=shape, mode=mode, align_corners=False)[0]
    return torch.softmax(logits, dim=0).numpy()


def make_inputs(kind: str):
    """The inputs of a program, as numpy arrays both libraries take."""
    from crfasrnn.densecrf import utils

    if kind == "image":
        photo = load_photo((500, 375))
        energies = np.ascontiguousarray(utils.unary_from_softmax(_smooth_probs(photo.shape[:2], 21)))
        return photo, energies
    rs = np.random.RandomState(1)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in VOLUME], indexing="ij")
    volume = (
        np.where(x * x + y * y + z * z < 0.4, 150.0, 60.0).astype(np.float32)
        + rs.randn(*VOLUME).astype(np.float32) * 10
    )
    probs = _smooth_probs(VOLUME, 2, seed=2)
    energies = np.ascontiguousarray(utils.unary_from_softmax(probs))
    gaussian = np.ascontiguousarray(utils.create_pairwise_gaussian((3.0, 3.0, 3.0), VOLUME))
    bilateral = np.ascontiguousarray(utils.create_pairwise_bilateral((5.0, 5.0, 5.0), (20.0,), volume, chdim=-1))
    return energies, gaussian, bilateral


def program(kind: str, dcrf, inputs) -> np.ndarray:
    """The program both libraries run: set-up, 5 iterations, the label map."""
    if kind == "image":
        photo, energies = inputs
        h, w = photo.shape[:2]
        d = dcrf.DenseCRF2D(w, h, energies.shape[0])
        d.setUnaryEnergy(energies)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=photo, compat=10)
    else:
        energies, gaussian, bilateral = inputs
        d = dcrf.DenseCRF(energies.shape[1], energies.shape[0])
        d.setUnaryEnergy(energies)
        d.addPairwiseEnergy(gaussian, compat=3)
        d.addPairwiseEnergy(bilateral, compat=10)
    return np.argmax(d.inference(5), axis=0)


def modules():
    import pydensecrf.densecrf as peer

    import crfasrnn.densecrf as ours

    return peer, ours


def bench(kind: str, repeats: int) -> dict:
    peer, ours = modules()
    inputs = make_inputs(kind)
    labels_peer, labels_ours = program(kind, peer, inputs), program(kind, ours, inputs)  # warm-up (and compilation)
    agreement = float((labels_peer == labels_ours).mean())
    times = {"peer": [], "ours": []}
    for _ in range(repeats):
        for name, module in (("peer", peer), ("ours", ours)):
            gc.collect()
            start = time.perf_counter()
            program(kind, module, inputs)
            times[name].append(time.perf_counter() - start)
    ratios = [o / p for o, p in zip(times["ours"], times["peer"])]
    return {
        "peer_s": statistics.median(times["peer"]),
        "ours_s": statistics.median(times["ours"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "label_agreement": agreement,
    }


def memory_child(kind: str, library: str) -> dict:
    peer, ours = modules()
    module = peer if library == "peer" else ours
    inputs = make_inputs(kind)
    small = (
        (
            inputs[0][:48, :64].copy(),
            np.ascontiguousarray(inputs[1].reshape(-1, 375, 500)[:, :48, :64].reshape(inputs[1].shape[0], -1)),
        )
        if kind == "image"
        else None
    )
    if small is not None:
        program(kind, module, small)  # loads and compiles the kernels outside the measurement
    else:
        program("image", module, make_inputs("image"))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kb("VmRSS")
    program(kind, module, inputs)
    peak = _proc_status_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024}


def measure_memory(kind: str, library: str) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", kind, library]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_mb"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["image", "volume"])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0
    try:
        modules()
    except ImportError:
        print("pydensecrf2 is not installed: run `make bench-setup` first", file=sys.stderr)
        return 2
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} alternated pairs")
    results = {}
    for kind in ["image", "volume"] if args.only is None else [args.only]:
        r = bench(kind, args.repeats)
        if not args.no_memory:
            r["peer_peak_mb"] = measure_memory(kind, "peer")
            r["ours_peak_mb"] = measure_memory(kind, "ours")
        results[kind] = r
        verdict = "ok" if r["ratio"] <= TARGETS[kind] else "ABOVE TARGET"
        line = (
            f"{kind:7s} pydensecrf2 {r['peer_s'] * 1e3:8.1f} ms   ours {r['ours_s'] * 1e3:8.1f} ms   ours/peer "
            f"{r['ratio']:.2f} (target <= {TARGETS[kind]}: {verdict}; "
            f"pairs {', '.join(f'{x:.2f}' for x in r['ratios'])})"
            f"   labels agree on {100 * r['label_agreement']:.3f} %"
        )
        if "peer_peak_mb" in r:
            line += f"\n{'':7s} peak memory: pydensecrf2 {r['peer_peak_mb']:.0f} MB, ours {r['ours_peak_mb']:.0f} MB"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
