"""Accuracy of every method on the shared ICH case and on fresh simulated brains.

ICH: field simulated by the forward model (2x padding) with noise sigma = s * noise_std / median(noise_std
in the mask), s = 1e-3 ppm, seed 0. MEDI uses W from the noise map, and so does PDI's Tikhonov
input channel (weighted Tikhonov); TKD and Tikhonov see the field only. Simulated brains: seeds 30000..30002 (never used in training, which draws from one
stream seeded 0, nor in validation, 10000+), 1x1x1.5 mm, noise 2e-3 ppm.
Writes benchmarks/results/accuracy.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ICH_LEVEL, ICH_SEED, ich_bleed, ich_case, mean_rows, write_table  # noqa: E402
from PDIQSMLib.evaluation import compare_methods, format_table  # noqa: E402
from PDIQSMLib.simulation import simulated_brain  # noqa: E402
from PDIQSMLib.weights import DEFAULT_WEIGHTS  # noqa: E402

SIM_SEEDS, SIM_NOISE = (30000, 30001, 30002), 2e-3
COLUMNS = ("rmse", "hfen", "ssim", "xsim", "mean_bleed", "std_bleed", "std_brain",
           "within_1sigma", "within_2sigma", "spearman_sigma_error", "seconds")


def methods() -> list[str]:
    return ["tkd", "tikhonov", "medi"] + (["pdi"] if DEFAULT_WEIGHTS.exists() else [])


def ich_table() -> str:
    chi, mask, noise, g, field = ich_case()
    bleed = ich_bleed(chi, mask)
    rows, _ = compare_methods(field, mask, g, chi, methods(), noise_std=noise,
                              regions={"bleed": bleed, "brain": mask & ~bleed})
    rows = {"truth": {"mean_bleed": float(chi[bleed].mean())}, **rows}
    return format_table(rows, COLUMNS)


def sim_table() -> str:
    per_method: dict[str, list[dict]] = {}
    for seed in SIM_SEEDS:
        s = simulated_brain((128, 150, 80), (1.0, 1.0, 1.5), seed, SIM_NOISE)
        rows, _ = compare_methods(s.field, s.mask, s.geometry, s.chi, methods())
        for m, r in rows.items():
            per_method.setdefault(m, []).append(r)
    return format_table(mean_rows(per_method), COLUMNS)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says what it does
    text = (f"## Shared ICH case (206x219x52, 1x1x3 mm; s = {ICH_LEVEL} ppm, seed {ICH_SEED})\n\n"
            "mean_bleed: mean chi (ppm) where the truth exceeds 1 ppm; std_*: mean predicted std there and elsewhere.\n\n"
            + ich_table()
            + f"\n\n## Simulated brains, mean of {len(SIM_SEEDS)} (128x150x80, 1x1x1.5 mm, noise {SIM_NOISE} ppm)\n\n"
            + sim_table())
    write_table("accuracy", "Accuracy of PDI and the MAP baselines", text)


if __name__ == "__main__":
    main()
