"""PDI-VI on the shared ICH case: hemorrhage mean, accuracy and calibration before and after fine-tuning,
and the speed of each fine-tuning variant. Field: forward model with noise s * noise_std / median,
s = 1e-3 ppm, seed 0 (as in bench_accuracy.py). Writes benchmarks/results/vi_<device>.md.

    python benchmarks/bench_vi.py [--iterations 100] [--samples 5] [--device cpu]
    python benchmarks/bench_vi.py --sweep --iterations 20   # lambda, K and variant: vi_sweep_<device>.md
    python benchmarks/bench_vi.py --uniform-noise           # the same noise level everywhere: vi_uniform_<device>.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ich_bleed, ich_case, write_table  # noqa: E402
from PDIQSMLib import solvers, vi  # noqa: E402
from PDIQSMLib.defaults import PDI_REFLECTIONS  # noqa: E402
from PDIQSMLib.evaluation import evaluate_arrays, format_table  # noqa: E402
from PDIQSMLib.geometry import Geometry  # noqa: E402
from PDIQSMLib.inference import predict  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.simulate_cli import ich_field  # noqa: E402
from PDIQSMLib.solvers import MEDI_LAMBDA  # noqa: E402
from PDIQSMLib.weighting import data_weight  # noqa: E402
from PDIQSMLib.weights import load_model  # noqa: E402

COLUMNS = ("rmse", "hfen", "ssim", "mean_bleed", "std_bleed", "std_brain", "within_1sigma", "within_2sigma",
           "spearman_sigma_error", "seconds", "seconds_per_iteration")


def row(mean, std, chi, mask, bleed, seconds, per_it=None) -> dict:
    r = evaluate_arrays(mean, chi, mask, std)
    r.update(mean_bleed=float(mean[bleed].mean()), seconds=seconds)
    if std is not None:
        r.update(std_bleed=float(std[bleed].mean()), std_brain=float(std[mask & ~bleed].mean()))
    if per_it is not None:
        r["seconds_per_iteration"] = per_it
    return r


def tuned_row(net, volume, config: vi.VIConfig, chi, mask, bleed) -> dict:
    result = vi.finetune(net, [volume], config)
    m, s = result.predict(volume)
    r = row(m, s, chi, mask, bleed, round(result.seconds, 1), round(result.seconds / len(result.history), 2))
    print(config, {k: r[k] for k in COLUMNS if k in r}, flush=True)
    return r


def data_limit_rows(chi, mask, noise, g: Geometry, bleed, uniform: bool) -> dict:
    """What the field can tell about the bleed: weighted least squares (lambda 1e-4, 100 PCG
    iterations) on the NOISE-FREE field, with W from the noise map (unless ``uniform``) and with W = 1.
    If even these stay below the truth, no method that weighs the data by the noise map can recover it."""
    clean = torch.from_numpy(ich_field(chi, mask, noise, 0.0, 0, g))
    weights = {} if uniform else {"wls, noise-free field, W from noise map": data_weight(mask, noise)}
    weights["wls, noise-free field, W = 1"] = data_weight(mask)
    rows = {}
    for name, w in weights.items():
        x = solvers.tikhonov_weighted(clean, torch.from_numpy(mask.astype("float32")), g, torch.from_numpy(w),
                                      lam=1e-4, max_iter=100, tol=1e-8).numpy()
        rows[name] = row(x, None, chi, mask, bleed, None)
        print(name, rows[name]["mean_bleed"], flush=True)
    return rows


def variant_timings(net, volume, args) -> str:
    """Seconds per iteration of each variant, sigma and estimator (a few iterations each): a table."""
    lines = ["| variant | sigma | estimator | seconds per iteration (K = %d) |" % args.samples, "|---|---|---|---|"]
    for variant in vi.VARIANTS:
        for variance, estimator in (("voxel", "mc"), ("voxel", "exact"), ("network", "mc")):
            config = vi.VIConfig(samples=args.samples, iterations=args.variant_iterations, variant=variant,
                                 variance=variance, estimator=estimator)
            result = vi.finetune(net, [volume], config)
            lines.append(f"| {variant} | {variance} | {estimator} | {result.seconds / len(result.history):.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def case(args) -> tuple[str, str]:
    """(description of the noise, suffix of the table's file name) for --uniform-noise or not."""
    return ("uniform noise (W = 1)", "_uniform") if args.uniform_noise else ("W from the noise map", "")


def sweep(net, volume, rows: dict, chi, mask, bleed, args) -> None:
    """lambda at K = 5, K at the default lambda, and the three variants: one run each."""
    base = dict(samples=5, iterations=args.iterations, variant="last", lam=MEDI_LAMBDA)
    runs = [dict(lam=lam) for lam in (0.0, 1e-4, 1e-3, 3e-3)]
    runs += [dict(samples=k) for k in (1, 10)] + [dict(variant="decoders")]
    for change in runs:
        c = {**base, **change}
        rows[f"{c['variant']}, lambda {c['lam']:g}, K {c['samples']}"] = tuned_row(
            net, volume, vi.VIConfig(**c), chi, mask, bleed)
    noise_text, suffix = case(args)
    text = (f"ICH case, s = 1e-3 ppm, seed 0; {noise_text}; {args.iterations} iterations per run, "
            "one setting changed at a time from (variant last, lambda 1e-3, K 5).\n\n" + format_table(rows, COLUMNS))
    write_table(f"vi_sweep{suffix}_{args.device}", "PDI-VI on the ICH case: lambda, K and variant", text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant-iterations", type=int, default=3, help="iterations timed per variant")
    ap.add_argument("--sweep", action="store_true", help="lambda, K and variant sweep instead")
    ap.add_argument("--defaults-only", action="store_true",
                    help="PDI, MEDI and PDI-VI1 / VI2 with their defaults only (no variants, no timings): vi_defaults_<device>.md")
    ap.add_argument("--uniform-noise", action="store_true",
                    help="noise of one level everywhere (W = 1: the bleed is measured); writes vi_uniform_<device>.md")
    args = ap.parse_args()
    chi, mask, noise, g, field = ich_case(args.uniform_noise)
    bleed = ich_bleed(chi, mask)
    net, _ = load_model(device=args.device)
    t0 = time.perf_counter()
    mean, std = predict(net, field, mask, args.device, geometry=g, weight=data_weight(mask, noise),
                        reflections=PDI_REFLECTIONS)  # as PDI runs by default
    rows = {"truth": {"mean_bleed": float(chi[bleed].mean())},
            "pdi": row(mean, std, chi, mask, bleed, round(time.perf_counter() - t0, 2))}
    t0 = time.perf_counter()
    medi = reconstruct(field, mask, g, Settings(method="medi"), noise_std=noise).mean
    rows["medi"] = row(medi, None, chi, mask, bleed, round(time.perf_counter() - t0, 1))
    volume = vi.prepare(field, mask, g, net.config.stride, data_weight(mask, noise), device=args.device,
                        prior=net.config.prior)
    if args.sweep:
        return sweep(net, volume, rows, chi, mask, bleed, args)
    d = vi.VIConfig()
    default = f"{d.variant}, sigma {d.variance}, {d.estimator}"
    if args.defaults_only:
        from PDIQSMLib.defaults import VI_LAMBDA_PDI_EDGES
        from PDIQSMLib.pipeline import vi_volume

        edged = vi_volume(net, field, mask, g, None, noise, args.device, "auto")  # no magnitude: M from PDI's map
        for name, v, lam in ((f"pdi-vi1 ({default}, edges from PDI's map)", edged, VI_LAMBDA_PDI_EDGES),
                             (f"pdi-vi2 ({default})", volume, 0.0)):
            rows[name] = tuned_row(net, v, vi.VIConfig(lam=lam, iterations=args.iterations), chi, mask, bleed)
        text = (f"ICH case, s = 1e-3 ppm, seed 0; W from the noise map; PDI-VI with its defaults ({default}, noise "
                f"levels read from the field, at most {args.iterations} iterations; VI1's TV edge mask from PDI's map, "
                f"lambda {VI_LAMBDA_PDI_EDGES:g}, as the pipeline without a magnitude; its seconds leave out the PDI "
                "pass that mask takes).\n\n" + format_table(rows, COLUMNS))
        write_table(f"vi_defaults_{args.device}", "PDI-VI on the ICH case, defaults", text)
        return
    runs = {f"pdi-vi1 ({default})": dict(lam=MEDI_LAMBDA), f"pdi-vi2 ({default})": dict(lam=0.0),
            "pdi-vi1 (variant last, the fastest)": dict(lam=MEDI_LAMBDA, variant="last")}
    if args.uniform_noise:  # the bleed keeps rising past the default's iterations
        runs[f"pdi-vi2 ({default}, {2 * args.iterations} iterations)"] = dict(lam=0.0, iterations=2 * args.iterations)
    else:
        runs.update({"pdi-vi1 (exact expectation)": dict(lam=MEDI_LAMBDA, estimator="exact"),
                     "pdi-vi1 (sigma from the network, the paper's)": dict(lam=MEDI_LAMBDA, variance="network")})
    for name, change in runs.items():
        config = vi.VIConfig(**{"samples": args.samples, "iterations": args.iterations, **change})
        rows[name] = tuned_row(net, volume, config, chi, mask, bleed)
    rows.update(data_limit_rows(chi, mask, noise, g, bleed, args.uniform_noise))
    noise_text, suffix = case(args)
    text = (f"ICH case, s = 1e-3 ppm, seed 0; {noise_text}; {args.iterations} iterations, K = {args.samples}, "
            f"lambda (VI1) = {MEDI_LAMBDA}; defaults: variant {d.variant}, sigma {d.variance}, estimator "
            f"{d.estimator}. The wls rows use the noise-free field (see data_limit_rows).\n\n"
            + format_table(rows, COLUMNS))
    if not args.uniform_noise:
        text += "\n\n## Fine-tuning variants (time per iteration on the ICH volume)\n\n" + variant_timings(net, volume, args)
    write_table(f"vi{suffix}_{args.device}", "PDI-VI on the ICH case" + (", uniform noise" if suffix else ""), text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
