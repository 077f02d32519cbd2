"""The CRF as a PyTorch operator: torch.compile, contention, first use and (on a GPU) batch / precision / memory.

A benchmark, not a test: every figure that is a ratio comes from runs alternated in one process (medians of several
pairs), because these machines' speed drifts.

    python bench/operator_speed.py [--repeats 5] [--device cpu|cuda] [--json OUT] [--only compile,contention,cold,gpu]

Sections:

* ``compile``: one training step (forward, cross-entropy, backward, SGD) of a small FCN-8s + CRF-RNN network
  (``CrfRnnNet``, width 1/16, 21 classes, 5 iterations, batch 2, 120x160), eager against ``torch.compile`` (default and
  ``fullgraph=True``); compilation time reported apart.
* ``contention``: the default forward (500x375, 21 classes, 10 iterations, as ``bench/crf_speed.py``) with one core
  kept busy by another process, against the one-thread forward on a quiet machine.
* ``cold``: ``crfasrnn refine`` on the bundled photo in a fresh process with an empty numba cache, and where its time
  goes (numba's compile events, per kernel); then the same command with the cache filled, and the fixed start-up
  cost of a ``crfasrnn refine`` call (a 16x16 image, where the CRF itself takes milliseconds).
* ``gpu`` (``--device cuda``): forward and forward+backward at 500x375, 21 classes, 10 iterations, batch 1 and 8, eager
  and compiled, float32 and autocast float16, with peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crf_speed  # (the photo, the unary and the layer's settings of the main benchmark)

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "src" / "crfasrnn" / "data"


def _timed(fn, sync=lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _median(values) -> float:
    return float(statistics.median(values))


# --- compile ----------------------------------------------------------------------------------------------------------


def bench_compile(repeats: int) -> dict:
    import torch

    from crfasrnn import CrfRnnNet

    torch.manual_seed(0)
    x = torch.rand(2, 3, 120, 160) * 255
    target = torch.randint(0, 21, (2, 120, 160))

    def make_step(net):
        opt = torch.optim.SGD(net.parameters(), lr=1e-6)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x), target)
            loss.backward()
            opt.step()

        return step

    nets = {
        mode: CrfRnnNet(num_classes=21, num_iterations=5, width=1 / 16) for mode in ("eager", "default", "fullgraph")
    }
    for net in nets.values():
        net.load_state_dict(nets["eager"].state_dict())
    eager = make_step(nets["eager"])
    steps, compile_s = {"eager": eager}, {}
    for mode in ("default", "fullgraph"):
        compiled = torch.compile(nets[mode], fullgraph=(mode == "fullgraph"))
        steps[mode] = make_step(compiled)
        compile_s[mode] = _timed(steps[mode])  # the first step compiles forward and backward
    eager()
    result = {"compile_s": compile_s}
    for mode in ("default", "fullgraph"):
        pairs = [(_timed(steps[mode]), _timed(eager)) for _ in range(repeats)]
        result[f"{mode}_s"] = _median(a for a, _ in pairs)
        result[f"{mode}_vs_eager"] = _median(a / b for a, b in pairs)
        result.setdefault("eager_runs_s", []).extend(b for _, b in pairs)
    result["eager_s"] = _median(result.pop("eager_runs_s"))
    return result


# --- contention ----------------------------------------------------------------------------------------------------


def bench_contention(repeats: int) -> dict:
    import torch

    crf, unary, image = crf_speed.setup_ours(crf_speed.SIZE, "cpu")
    default_threads = torch.get_num_threads()

    def forward():
        with torch.no_grad():
            crf(unary, image)

    def one_thread():
        torch.set_num_threads(1)
        try:
            forward()
        finally:
            torch.set_num_threads(default_threads)

    forward()
    one_thread()
    rows = []
    for _ in range(repeats):
        quiet_one = _timed(one_thread)
        quiet_default = _timed(forward)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)  # let the spinner take its core
            busy_default = _timed(forward)
        finally:
            busy.kill()
            busy.wait()
        rows.append((quiet_one, quiet_default, busy_default))
    from crfasrnn import _parallel

    return {
        "threads": default_threads,
        "threading_layer": _parallel.threading_layer(),
        "quiet_one_thread_s": _median(r[0] for r in rows),
        "quiet_default_s": _median(r[1] for r in rows),
        "busy_default_s": _median(r[2] for r in rows),
        "busy_default_vs_quiet_one_thread": _median(r[2] / r[0] for r in rows),
    }


# --- cold start -------------------------------------------------------------------------------------------------------

_COLD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from numba.core import event
with event.install_recorder("numba:compile") as recorder:
    from crfasrnn.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exit:
        if exit.code:
            raise
total = time.perf_counter() - start
open_events, kernels = {}, {}
for ts, e in recorder.buffer:
    name = e.data["dispatcher"].py_func.__name__
    if e.is_start:
        open_events.setdefault(name, []).append(ts)
    else:
        began = open_events[name].pop()
        if not any(open_events.values()):  # outermost compile only: nested ones are inside it
            kernels[name] = kernels.get(name, 0.0) + ts - began
print(json.dumps({"total_s": total, "compile_s": kernels}))
"""


def _refine_run(cache: str, image: Path, labels: Path, out: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _COLD_SCRIPT, "refine", str(image), "--labels", str(labels), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = wall
    return report


def bench_cold(repeats: int) -> dict:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photo, coarse = DATA / "astronaut.jpg", DATA / "astronaut_coarse.png"
        tiny_photo, tiny_labels = tmp_path / "tiny.png", tmp_path / "tiny_labels.png"
        Image.open(photo).convert("RGB").resize((16, 16)).save(tiny_photo)
        Image.open(coarse).resize((16, 16), Image.NEAREST).save(tiny_labels)
        cache = str(tmp_path / "numba-cache")
        cold = _refine_run(cache, photo, coarse, tmp_path / "a.png")
        warm = [_refine_run(cache, photo, coarse, tmp_path / "b.png") for _ in range(repeats)]
        tiny = [_refine_run(cache, tiny_photo, tiny_labels, tmp_path / "c.png") for _ in range(repeats)]
        start = time.perf_counter()
        for _ in range(repeats):
            subprocess.run([sys.executable, "-c", "import crfasrnn.cli"], check=True)
        import_s = (time.perf_counter() - start) / repeats
        interpreter = _median(
            _timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in range(repeats)
        )
    return {
        "photo_size": list(Image.open(photo).size),
        "cold_wall_s": cold["wall_s"],
        "cold_compile_s": dict(sorted(cold["compile_s"].items(), key=lambda kv: -kv[1])),
        "cold_compile_total_s": sum(cold["compile_s"].values()),
        "warm_wall_s": _median(r["wall_s"] for r in warm),
        "warm_compile_total_s": max(sum(r["compile_s"].values()) for r in warm),
        "fixed_startup_s": _median(r["wall_s"] for r in tiny),
        "import_cli_s": import_s,
        "python_startup_s": interpreter,
    }


# --- GPU --------------------------------------------------------------------------------------------------------------


def bench_gpu(repeats: int, device: str, sizes=(1, 8)) -> list[dict]:
    import torch

    from crfasrnn import CrfRnn

    w, h = crf_speed.SIZE
    unary1 = torch.from_numpy(crf_speed.make_unary(h, w))[None].to(device)
    image1 = torch.from_numpy(crf_speed.load_photo(crf_speed.SIZE)).permute(2, 0, 1)[None].float().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in sizes:
        unary, image = unary1.expand(batch, -1, -1, -1).contiguous(), image1.expand(batch, -1, -1, -1).contiguous()
        crf = CrfRnn(crf_speed.NUM_CLASSES, crf_speed.NUM_ITERATIONS, **crf_speed.KERNEL).to(device)
        for compiled in (False, True):
            layer = torch.compile(crf, fullgraph=True) if compiled else crf
            for precision in ("float32", "autocast-float16"):
                amp = precision != "float32"

                def forward(layer=layer, unary=unary, image=image, amp=amp):
                    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=amp):
                        layer(unary, image)

                def forward_backward(layer=layer, unary=unary, image=image, amp=amp):
                    u = unary.clone().requires_grad_(True)
                    with torch.autocast(device, dtype=torch.float16, enabled=amp):
                        out = layer(u, image)
                    out.float().square().mean().backward()

                row = {"batch": batch, "compiled": compiled, "precision": precision}
                for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
                    fn()  # warm-up (and compilation)
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row[f"{name}_ms"] = 1e3 * _median(_timed(fn, sync) for _ in range(repeats))
                    if device == "cuda":
                        row[f"{name}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                rows.append(row)
                print("  ", json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", default="", help="comma-separated sections (compile, contention, cold, gpu)")
    parser.add_argument("--gpu-batches", default="1,8", help="batch sizes of the gpu section")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    default = "gpu" if args.device == "cuda" else "compile,contention,cold"
    sections = [s for s in (args.only or default).split(",") if s]
    unknown = set(sections) - {"compile", "contention", "cold", "gpu"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    import torch

    report: dict = {"torch": torch.__version__, "device": args.device, "repeats": args.repeats, "cpus": os.cpu_count()}
    if "compile" in sections:
        print("compile: a training step of CrfRnnNet (width 1/16, 21 classes, 5 iterations, 2x120x160)", flush=True)
        r = report["compile"] = bench_compile(args.repeats)
        print(
            f"  eager {r['eager_s']:.3f} s; compiled {r['default_s']:.3f} s (x{r['default_vs_eager']:.2f}), "
            f"fullgraph {r['fullgraph_s']:.3f} s (x{r['fullgraph_vs_eager']:.2f}); compilation "
            f"{r['compile_s']['default']:.1f} s / {r['compile_s']['fullgraph']:.1f} s",
            flush=True,
        )
    if "contention" in sections:
        print("contention: the 500x375 forward (21 classes, 10 iterations) with one core busy", flush=True)
        r = report["contention"] = bench_contention(args.repeats)
        print(
            f"  quiet, 1 thread {r['quiet_one_thread_s']:.3f} s; quiet, {r['threads']} threads "
            f"{r['quiet_default_s']:.3f} s; one core busy, {r['threads']} threads {r['busy_default_s']:.3f} s: "
            f"x{r['busy_default_vs_quiet_one_thread']:.2f} the quiet one-thread time (target <= 1.2; layer "
            f"{r['threading_layer']})",
            flush=True,
        )
    if "cold" in sections:
        print("cold: crfasrnn refine on the bundled photo, empty numba cache, then cached", flush=True)
        r = report["cold"] = bench_cold(args.repeats)
        kernels = ", ".join(f"{k} {v:.2f}" for k, v in r["cold_compile_s"].items())
        print(
            f"  first call {r['cold_wall_s']:.1f} s, of which numba compiles {r['cold_compile_total_s']:.1f} s "
            f"({kernels})",
            flush=True,
        )
        print(
            f"  cached: {r['warm_wall_s']:.2f} s; fixed start-up of a call (16x16 image) {r['fixed_startup_s']:.2f} s "
            f"(python {r['python_startup_s']:.2f} s, import of the CLI {r['import_cli_s']:.2f} s)",
            flush=True,
        )
    if "gpu" in sections:
        print(f"gpu: 500x375, 21 classes, 10 iterations on {args.device}", flush=True)
        batches = tuple(int(b) for b in args.gpu_batches.split(","))
        report["gpu"] = bench_gpu(args.repeats, args.device, batches)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
