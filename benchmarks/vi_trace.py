"""PDI-VI's path on realistic simulated brains: data misfit and accuracy at every iteration (issue 12).

    python benchmarks/vi_trace.py pdi-vi1 LR SEED [SEED ...] [--noise-level cone] [--lam L]
        [--warmup N] [--tv-start F --tv-iterations N] [--iterations N] [--lr-final F]
    (LR: Adam's step, 1e-3 is the default; L: PDI-VI1's TV weight, defaults.VI_LAMBDA by default;
    SEED 0 is the shared ICH case, s = 1e-3 ppm, W from its noise map, as in bench_vi.py)

For each brain (``simulation.REALISTIC``, brains only, the seeds' own volumes), runs the method with its
defaults except the learning rate (and with --lam the TV weight) and prints, every 5 iterations, the RMS
of the mean map's weighted misfit W (D mu - b) inside the mask (ppm) and the demeaned NRMSE against the truth (%), beside the field's two
noise readings (the cone's, what no map explains, and the white noise by second differences), and the
objective's deterministic part, misfit + lambda TV (sum of W^2 (D mu - b)^2 + lambda sum |M grad mu|, the
function MEDI minimises), for the path and for the true map, and the residual's cone share over the cone's
volume share (``fieldstats.cone_share`` of W (D mu - b)): 1 for an isotropic residual, below 1 while dipolar
structure is left in it, above 1 once the map has absorbed field outside the cone (the true map's is
printed too). The question it answers: when does fine-tuning help, and does its misfit tell (a discrepancy rule: tune only while the
misfit exceeds the cone's level)? Output goes to stdout; the runs quoted in the notes are in
benchmarks/results/vi_trace_cpu.md.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ICH_LEVEL, ich_case  # noqa: E402
from PDIQSMLib import vi  # noqa: E402
from PDIQSMLib.fieldstats import cone_noise, cone_share, second_difference_noise  # noqa: E402
from PDIQSMLib.gradient import grad  # noqa: E402
from PDIQSMLib.inference import paste  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.simulation import REALISTIC, Sample, make_volume  # noqa: E402


AVERAGE_FROM = 80  # the path's last maps from here on are also averaged (Polyak), printed beside the final map


def brain(seed: int) -> tuple[Sample, np.ndarray | None]:
    """(realistic brain ``seed``, no noise map), or for seed 0 (the ICH case, its noise map)."""
    if seed != 0:
        return make_volume(np.random.default_rng(seed), replace(REALISTIC, anatomical_fraction=1.0)), None
    chi, mask, noise, g, field = ich_case()
    return Sample(chi, mask, field, g, ICH_LEVEL), noise


def trace_run(method: str, lr: float, seed: int, noise_level: str | None = None, lam: float | None = None,
              **schedule) -> None:
    s, noise_std = brain(seed)
    m = s.mask > 0
    trace: list[tuple[int, float, float, float, float]] = []
    loss_terms, finetune = vi.loss_terms, vi.finetune
    truth: list[float] = []
    lams: list[float] = []  # the run's lambda: the objective is scored with it, not a scheduled (--tv-start) weight
    average: list = [None, 0]  # sum of the maps after iteration AVERAGE_FROM, and how many

    def objective(mu: torch.Tensor, data: vi.VolumeData, tv_weight: float) -> tuple[float, float, float]:
        r = data.weight * (data.op.forward(mu) - data.field)
        tv = (data.edges * grad(mu[0, 0], data.geometry.voxel_size).abs()).sum()
        share, volume = cone_share(r[0, 0].double().cpu().numpy(), (data.mask[0, 0] > 0).cpu().numpy(), data.geometry)
        return float(torch.sqrt((r**2).sum() / data.mask.sum())), float((r**2).sum() + tv_weight * tv), share / volume

    def traced(mean, logvar, data, config, noise, gen=None):
        with torch.no_grad():
            mu = mean * data.mask
            if not truth:
                true_box = torch.zeros_like(mu)
                true_box[0, 0, :data.size[0], :data.size[1], :data.size[2]] = torch.from_numpy(s.chi[data.box])
                truth.extend(objective(true_box * data.mask, data, lams[0])[1:])
            full = paste(mu[0, 0, :data.size[0], :data.size[1], :data.size[2]].cpu().numpy(), m, data.box)
            trace.append((len(trace), *objective(mu, data, lams[0]), nrmse_demeaned(full, s.chi, m)))
            if len(trace) > AVERAGE_FROM:
                average[0] = full if average[0] is None else average[0] + full
                average[1] += 1
        return loss_terms(mean, logvar, data, config, noise, gen)

    vi.loss_terms = traced
    def tuning(net, vols, config, *a, **k):
        lams.append(config.lam)
        return finetune(net, vols, replace(config, lr=lr, **schedule), *a, **k)

    vi.finetune = tuning
    try:
        settings = Settings(method=method, device="cpu", noise_level=noise_level, lam=lam)
        r = reconstruct(s.field, s.mask, s.geometry, settings, noise_std=noise_std)
    finally:
        vi.loss_terms, vi.finetune = loss_terms, finetune
    print(seed, method, "cone", round(cone_noise(s.field, m, s.geometry), 5), "white",
          round(second_difference_noise(s.field, m), 5), "final", round(nrmse_demeaned(r.mean, s.chi, m), 2),
          r.info.get("iterations"), flush=True)
    print("  lr", lr, schedule or "", "noise level", noise_level or "default", "lambda", lam or "default",
          "true map: objective %.2f residual cone share / volume %.3f" % tuple(truth),
          "best (iteration, misfit, objective, cone ratio, nrmse)", min(trace, key=lambda t: t[4]))
    if average[1]:
        print(f"  mean of the maps of iterations {AVERAGE_FROM}-{len(trace) - 1} (an iterate average): nrmse "
              f"{nrmse_demeaned(average[0] / average[1], s.chi, m):.2f}")
    for t in trace[::5] + [trace[-1]]:
        print("  it %d misfit %.5f objective %.2f cone ratio %.3f nrmse %.2f" % t, flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=("pdi-vi1", "pdi-vi2"))
    ap.add_argument("lr", type=float)
    ap.add_argument("seeds", type=int, nargs="+")
    ap.add_argument("--noise-level", choices=("cone", "white"), help="both levels from this reading (default: white to tune, cone for sigma)")
    ap.add_argument("--lam", type=float, help="PDI-VI1's TV weight (default: the method's, defaults.VI_LAMBDA)")
    ap.add_argument("--warmup", type=int, default=0, help="iterations over which Adam's step rises to LR")
    ap.add_argument("--tv-start", type=float, default=1.0, help="the TV weight's start, in lambdas")
    ap.add_argument("--tv-iterations", type=int, default=0, help="iterations over which it falls to lambda")
    ap.add_argument("--iterations", type=int, help="fine-tuning iterations (default: the method's)")
    ap.add_argument("--lr-final", type=float, help="Adam's step falls from LR to this along a cosine")
    args = ap.parse_args()
    schedule = {k: v for k, v in (("warmup", args.warmup), ("tv_start", args.tv_start),
                                  ("tv_iterations", args.tv_iterations), ("iterations", args.iterations)) if v}
    if args.lr_final is not None:
        schedule["lr_final"] = args.lr_final
    for seed in args.seeds:
        trace_run(args.method, args.lr, seed, args.noise_level, args.lam, **schedule)
