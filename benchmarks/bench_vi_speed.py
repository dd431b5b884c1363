"""What one PDI-VI iteration costs on a whole brain, by memory layout and estimator, beside PDI and MEDI.

The brain is a realistic simulated one (MNI152 anatomy, non-dipolar field terms; seed 33000, never used in
training) at 1.06 mm isotropic in at most 160^3, the size of the real 3 T brain issue 12 quotes PDI-VI's
943 s on. Each configuration runs ``--iterations`` fine-tuning iterations (sigma per voxel) of the default
variant (the decoders, the encoder's features cached) and of every weight tuned, in fp32 or with the network's
passes under bf16 autocast (``VIConfig.precision``); the first is dropped as warm-up.
MEDI (automatic lambda, to convergence) and PDI are timed once on the same field. Writes
benchmarks/results/vi_speed_<device>.md.

    python benchmarks/bench_vi_speed.py [--iterations 4] [--device cpu] [--whole-run] [--name vi_speed_cpu_epyc]
    (--iterations 0: no per-iteration rows)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib import simulation, vi  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.weights import load_model  # noqa: E402

SEED = 33000


def per_iteration(net, volume, config: vi.VIConfig) -> float:
    """Seconds per iteration after the first (fixed iteration count: the convergence stop is off)."""
    times = []
    vi.finetune(net, [volume], config, log=lambda r: times.append(r["seconds"]))
    steps = [b - a for a, b in zip(times, times[1:])]
    return sum(steps) / len(steps)


def whole_run_text(info: dict) -> str:
    """What a whole PDI-VI run did, from its run record: where its map was kept, the iterations and precision."""
    where = info["vi_where"]
    if where.get("fine_tuned", "").startswith("no"):
        return "whole run: the field agrees with PDI's map, nothing fine-tuned"
    kept = "everywhere" if where["kept"] == "everywhere" else f"{100 * where['share_of_mask']:.2f} % of the mask"
    edges = "PDI's edges, " if str(info.get("edges", "")).startswith("PDI") else ""
    return (f"whole run: {edges}{info['iterations']} iterations, network passes {info['precision']}, map kept "
            f"{kept}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--whole-run", action="store_true", help="also time PDI-VI1 and PDI-VI2 with every default, end to end")
    ap.add_argument("--name", help="the table's name (default vi_speed_<device>), e.g. to keep another CPU's")
    args = ap.parse_args()
    sample, _ = simulation.realistic_brain(SEED, (1.06, 1.06, 1.06), max_shape=(160, 160, 160))
    net, _ = load_model(None, args.device)
    volume = vi.prepare(sample.field, sample.mask, sample.geometry, net.config.stride, device=args.device,
                        prior=net.config.prior)
    rows = []
    t = time.perf_counter()
    medi = reconstruct(sample.field, sample.mask, sample.geometry, Settings(method="medi", device=args.device))
    medi_s = time.perf_counter() - t
    rows.append(("MEDI, automatic lambda (whole run)", f"{medi_s:.1f}", "", str(medi.info.get('medi', {}).get('iterations', ''))))
    t = time.perf_counter()
    reconstruct(sample.field, sample.mask, sample.geometry, Settings(method="pdi", device=args.device))
    rows.append(("PDI (whole run)", f"{time.perf_counter() - t:.1f}", "", ""))
    for method in ("pdi-vi1", "pdi-vi2") if args.whole_run else ():
        t = time.perf_counter()
        info = reconstruct(sample.field, sample.mask, sample.geometry, Settings(method=method, device=args.device)).info
        whole = time.perf_counter() - t
        rows.append((f"{method.upper()}, every default ({whole_run_text(info)})", f"{whole:.1f}", "",
                     f"{whole / medi_s:.1f} MEDI runs"))
    layouts = {"channels-last": net, "contiguous": copy.deepcopy(net).to(memory_format=torch.contiguous_format)}
    if args.device.startswith("cuda"):
        layouts = {"default": net}
    for layout, model in layouts.items() if args.iterations > 0 else ():
        for estimator, precision, variant in (("exact", "fp32", "decoders"), ("exact", "bf16", "decoders"),
                                              ("mc", "fp32", "full"), ("exact", "fp32", "full"),
                                              ("exact", "bf16", "full")):
            config = vi.VIConfig(iterations=args.iterations, estimator=estimator, tol=0.0, variance_iterations=1,
                                 precision=precision, variant=variant)
            s = per_iteration(model, volume, config)
            rows.append((f"PDI-VI1 iteration, {layout}, {estimator}" + (" (K = 5)" if estimator == "mc" else "")
                         + f", {precision}, variant {variant}" + (" (default)" if variant == vi.DEFAULT_VARIANT else ""),
                         f"{s:.2f}", f"{100 * s / medi_s:.1f}", ""))
    shape = "x".join(str(n) for n in sample.field.shape)
    box = "x".join(str(n) for n in volume.field.shape[-3:])
    lines = [f"Realistic brain seed {SEED}, {shape} at 1.06 mm (network box {box}, {int(sample.mask.sum())} mask "
             f"voxels)" + (f"; {args.iterations} iterations per configuration, the first dropped." if args.iterations else ".")
             + (" PDI-VI's own choice of precision is timed in its run ('auto')." if args.whole_run else ""), "",
             "| what | seconds | 100 iterations in MEDI runs | MEDI iterations |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    write_table(args.name or f"vi_speed_{'cuda' if args.device.startswith('cuda') else 'cpu'}", "PDI-VI speed on a whole brain",
                "\n".join(lines))


if __name__ == "__main__":
    main()
