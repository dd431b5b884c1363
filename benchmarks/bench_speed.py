"""Time and peak memory of the forward model, TKD, Tikhonov, MEDI and PDI inference (CPU, or GPU when present).

Each measurement runs in a fresh subprocess so that its peak resident memory is its own; the data
(a procedural brain and its field, 1e-3 ppm noise) are made before the clock starts. Timings are
the best of ``--repeats`` runs (MEDI: one run). Writes benchmarks/results/speed_<device>.md.

    python benchmarks/bench_speed.py [--device cpu|cuda] [--shapes 160,160,160 256,256,48]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ("forward", "tkd", "tikhonov", "medi", "pdi")


def measure(op: str, shape: tuple[int, int, int], device: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from PDIQSMLib import phantoms, solvers
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.physics import DipoleOperator
    from PDIQSMLib.simulation import add_noise, field_of

    vs = (1.0, 1.0, 1.0) if shape[2] > 100 else (1.0, 1.0, 3.0)
    g = Geometry(vs)
    rng = np.random.default_rng(0)
    ph = phantoms.brain(shape, vs, rng)
    field_np = add_noise(field_of(ph.chi, ph.mask, g, 1.0), ph.mask, 1e-3, rng)
    field = torch.from_numpy(field_np).to(device)
    mask = torch.from_numpy(ph.mask.astype(np.float32)).to(device)
    if op == "pdi":
        from PDIQSMLib.inference import predict
        from PDIQSMLib.network import PRESETS, PDINet

        net = PDINet(PRESETS["default"]).to(device).eval()
        run = lambda: predict(net, field_np, ph.mask, device, geometry=g)  # noqa: E731
    elif op == "forward":
        A = DipoleOperator(shape, g, 1.0, torch.float32, device)
        run = lambda: A.forward(field)  # noqa: E731
    elif op == "tkd":
        run = lambda: solvers.tkd(field, mask, g)  # noqa: E731
    elif op == "tikhonov":
        run = lambda: solvers.tikhonov(field, mask, g)  # noqa: E731
    else:
        iters = []
        run = lambda: (iters.clear(), solvers.medi(field, mask, g, progress=lambda i, n: iters.append(i)))  # noqa: E731
        repeats = 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - t0)
    out = {"op": op, "shape": "x".join(map(str, shape)), "seconds": round(best, 3),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rss_added_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024, 1)}
    if device == "cuda":
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if op == "medi":
        out["iterations"] = len(iters)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=["160,160,160", "256,256,48"])
    ap.add_argument("--ops", nargs="+", default=list(OPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("OP", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], tuple(map(int, args.one[1].split(","))), args.device, args.repeats)))
        return
    from benchmarks.common import write_table

    rows = []
    for shape in args.shapes:
        for op in args.ops:
            proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats),
                                   "--one", op, shape], capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    gpu = args.device == "cuda"
    lines = ["| operation | shape | seconds | peak RSS (MB) | RSS added by the run (MB) |" + (" GPU peak (MB) |" if gpu else "")
             + " note |", "|---|---|---|---|---|" + ("---|" if gpu else "") + "---|"]
    for r in rows:
        note = f"{r['iterations']} iterations" if "iterations" in r else ("untrained weights (same cost)" if r["op"] == "pdi" else "")
        lines.append(f"| {r['op']} | {r['shape']} | {r['seconds']} | {r['peak_rss_mb']} | {r['rss_added_mb']} |"
                     + (f" {r.get('gpu_peak_mb', '')} |" if gpu else "") + f" {note} |")
    write_table(f"speed_{args.device}", f"Speed and memory ({args.device})", "\n".join(lines))


if __name__ == "__main__":
    main()
