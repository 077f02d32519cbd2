"""Peak memory of loading the published-size CRF-RNN weights (a 538 MB Caffe V1 model), with no network access.

Writes a synthetic caffemodel with the real layer names and shapes (random values; the layout of the published
TVG_CRFRNN_COCO_VOC.caffemodel) to a temporary folder, then measures in fresh subprocesses the peak resident memory
(VmHWM) above the process's state just before loading, for ``load_model`` (what ``crfasrnn segment`` uses) and for
``load_weights`` into an already-built network, and prints it as a multiple of the file size.

    python bench/weights_memory.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, path: str) -> dict:
    import gc

    from crfasrnn import CrfRnnNet
    from crfasrnn.weights import load_model, load_weights

    model = CrfRnnNet() if mode == "load_weights" else None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    if model is None:
        load_model(path)
    else:
        load_weights(model, path)
    return {"mode": mode, "seconds": time.perf_counter() - start, "peak_above_mb": _status_mb("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", metavar="DIR", help="write the synthetic file here and keep it")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic_weights import random_state_dict, write_caffemodel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "synthetic_full_v1.caffemodel"
        if not path.exists():
            print("writing a full-size synthetic caffemodel ...", flush=True)
            write_caffemodel(path, random_state_dict(width=1.0), v1=True, raw=True)
        size_mb = path.stat().st_size / 2**20
        print(f"file: {path.stat().st_size:,} bytes ({size_mb:.0f} MiB)")
        for mode in ("load_model", "load_weights"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = " (on top of the network's own 538 MB)" if mode == "load_weights" else " (network included)"
            print(
                f"  {mode:<13} peak {r['peak_above_mb']:7.0f} MiB above the start = "
                f"{r['peak_above_mb'] / size_mb:.2f}x the file{extra}, {r['seconds']:.1f} s"
            )


if __name__ == "__main__":
    main()
