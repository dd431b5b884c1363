"""Peak memory and time of TKD, MEDI and PDI against the volume size (issue 14, big volumes).

Each case runs in a fresh process (peak resident memory from getrusage, minus the process's memory before
the method ran: the inputs, torch and PDI's network are not counted; PDI-VI loads its own inside the run). The
field is smooth noise inside an ellipsoid mask filling ~50 % of the box, at 1 mm. MEDI runs a few iterations;
its time is given per iteration and for its default 200 (extrapolated, said so). The fitted bytes per voxel
feed ``PDIQSMLib.memory``. Writes benchmarks/results/memory_cpu.md (--name).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, {root!r})
from PDIQSMLib.geometry import Geometry
from PDIQSMLib.memory import working_voxels
from PDIQSMLib.pipeline import Settings, reconstruct
shape, method, iters = {shape!r}, {method!r}, {iters!r}
torch.set_num_threads({threads})
g = np.ogrid[tuple(slice(0, n) for n in shape)]
mask = sum(((x - (n - 1) / 2) / (0.45 * n)) ** 2 for x, n in zip(g, shape)) <= 1.0
field = (np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.01) * mask
settings = Settings(method=method, device="cpu", iterations=iters, lam=1e-3 if method in ("medi", "tikhonov") else None,
                    **({{"vi_precision": {precision!r}, "vi_where": "everywhere",  # its worst case: tuned everywhere
                        "vi_variant": {variant!r}}}
                       if method.startswith("pdi-vi") else {{}}))
if method == "pdi":
    from PDIQSMLib.weights import load_model
    load_model(None, "cpu")  # the network's own memory is not the method's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
res = reconstruct(field, mask, Geometry((1.0, 1.0, 1.0)), settings)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
box = int(np.prod([np.ptp(np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != a)))[0]) + 1 for a in range(3)]))
working = working_voxels(method, shape, mask, settings.pad)
print(json.dumps(dict(seconds=seconds, peak=peak, before=before, box=box, working=working,
                      precision=res.info.get("precision"),
                      iterations=res.info.get("medi", dict()).get("iterations"))))
"""


def run(shape, method, iters, threads, precision="auto", variant=None):
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), shape=tuple(shape), method=method, iters=iters,
                        precision=precision, variant=variant, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="96x96x64,160x160x96,256x256x160,384x384x256")
    ap.add_argument("--methods", default="tkd,medi,pdi")
    ap.add_argument("--medi-iterations", type=int, default=3, help="iterations of MEDI (and PDI-VI when measured)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vi-precision", default="auto", help="PDI-VI's precision: auto, bf16 or fp32")
    ap.add_argument("--vi-variant", default=None, help="PDI-VI's variant: full, decoders (its default) or last")
    ap.add_argument("--name", default="memory_cpu", help="the table's name: benchmarks/results/NAME.md")
    args = ap.parse_args()
    lines = ["| method | shape | voxels (M) | mask box (M) | peak above inputs (GiB) | bytes / voxel | bytes / working voxel "
             "| seconds | note |", "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes.split(","):
        shape = tuple(int(v) for v in size.split("x"))
        n = shape[0] * shape[1] * shape[2]
        for method in args.methods.split(","):
            iters = args.medi_iterations if method in ("medi", "pdi-vi1", "pdi-vi2") else None
            r = run(shape, method, iters, args.threads, args.vi_precision, args.vi_variant)
            if "error" in r:
                lines.append(f"| {method} | {size} | {n / 1e6:.1f} | | | | | | failed: {r['error'][:80]} |")
            else:
                used = max(r["peak"] - r["before"], 0)
                pad = 1.5 ** 3 if method in ("tkd", "tikhonov") else 1.0
                per = used / (r["box"] if method.startswith("pdi") else n * pad)
                note = ""
                if method == "medi":
                    it = r["iterations"] or args.medi_iterations
                    note = f"{r['seconds'] / it:.2f} s/iteration; 200 iterations ~ {200 * r['seconds'] / it / 60:.1f} min (extrapolated)"
                elif method.startswith("pdi-vi"):
                    note = f"{args.vi_variant or 'decoders'}, {r['precision']}, {iters} iterations"
                lines.append(f"| {method} | {size} | {n / 1e6:.1f} | {r['box'] / 1e6:.1f} | {used / 2**30:.2f} | {per:.0f} | "
                             f"{used / r['working']:.0f} | "
                             f"{r['seconds']:.1f} | {note} |")
            print(lines[-1], flush=True)
    write_table(args.name, "Peak memory and time against the volume size (CPU)", __doc__.split("\n\n", 1)[1].strip()
                + "\n\n" + "\n".join(lines) + "\n\nbytes / voxel: per voxel of the padded grid (TKD, Tikhonov: 1.5 per axis), of the volume (MEDI) or of the mask's "
                "bounding box (PDI and PDI-VI run on the box); bytes / working voxel: per voxel that "
                "`memory.estimate_bytes` counts (for PDI and PDI-VI the box with the network's margin, within the volume).")


if __name__ == "__main__":
    main()
