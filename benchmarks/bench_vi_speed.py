"""What one PDI-VI iteration costs on a whole brain, by memory layout and estimator, beside PDI and MEDI.

The brain is a realistic simulated one (MNI152 anatomy, non-dipolar field terms; seed 33000, never used in
training) at 1.06 mm isotropic in at most 160^3, the size of the real 3 T brain issue 12 quotes PDI-VI's
943 s on. Each configuration runs ``--iterations`` fine-tuning iterations (sigma per voxel) of the default
variant (the decoders, the encoder's features cached) and of every weight tuned, in fp32 or with the network's
passes under bf16 autocast (``VIConfig.precision``); the first is dropped as warm-up.
MEDI (automatic lambda, to convergence) and PDI are timed once on the same field. Writes
benchmarks/results/vi_speed_<device>.md.

    python benchmarks/bench_vi_speed.py [--iterations 4] [--device cpu]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--device", default="cpu")
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
    layouts = {"channels-last": net, "contiguous": copy.deepcopy(net).to(memory_format=torch.contiguous_format)}
    if args.device.startswith("cuda"):
        layouts = {"default": net}
    for layout, model in layouts.items():
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
             f"voxels); {args.iterations} iterations per configuration, the first dropped.", "",
             "| what | seconds | 100 iterations in MEDI runs | MEDI iterations |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    write_table(f"vi_speed_{'cuda' if args.device.startswith('cuda') else 'cpu'}", "PDI-VI speed on a whole brain",
                "\n".join(lines))


if __name__ == "__main__":
    main()
