"""PDI where a noise map marks a bleed's field unreliable: that field predicted by the weighted Tikhonov prior (one
pass) or, in a second pass, by PDI's own first map (``network_io.REFILLS``).

The network cannot read a field that is noise (an acute bleed's signal void): those voxels' field channel holds a
predicted field instead (``network_io.network_inputs``). The weighted Tikhonov prior predicts it from the reliable
field around, but shrinks a bleed; PDI's first map, which reads the bleed's dipole field around it too, may predict it
better. Per case, PDI (or ``--method``) with 0 and 1 refill (PDI's default two reflections each): with the true noise
map, and with the regions read off the field (no noise map, ``--noisy-regions auto``). Sets as ``noisy_regions.py``:
calibration bleed brains 81000-81005 (where the count was chosen), test bleed brains 80000-80005 and the shared ICH
case (seed 0), the bleeds' noise ``--factor`` times the brain's (it matters only without the noise map). Demeaned
NRMSE (%) over the brain, the bleed's mean chi over the truth's in brackets. No timings (a refill is one more PDI
run).

    python benchmarks/refill.py [--calibration 81000 ...] [--test 80000 ... 0] [--factor 60] [--name refill]
                                [--method pdi|pdi-vi1|pdi-vi2] [--maps true auto]
    (session 30 ran the two sets apart: --test --name refill_calibration and --calibration --name refill_test;
    session 31 PDI-VI1 from the refilled inputs, --method pdi-vi1 --maps true: refill_vi.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from benchmarks.noisy_regions import case  # noqa: E402
from benchmarks.vi_change import LESION_SEEDS  # noqa: E402
from PDIQSMLib import network_io  # noqa: E402
from PDIQSMLib.evaluation import evaluate_arrays  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402

REFILL_COUNTS = (0, 1)


def run(field, mask, g, truth, bleed, noise_std, refills: int, method: str = "pdi") -> tuple[float, str]:
    """(demeaned NRMSE %, its cell) of ``method`` with ``refills`` refills; ``noise_std`` None: regions read off the
    field. Without a noise map PDI does not refill by default, so the count is forced through a map built from the
    regions."""
    saved = network_io.REFILLS
    network_io.REFILLS = refills
    try:
        if noise_std is None:  # the regions read off the field, handed over as if given, so the refill count applies
            from PDIQSMLib.weighting import noisy_regions

            noise_std = noisy_regions(field, mask)
        settings = Settings(method=method, device="cpu", noisy_regions="off")
        res = reconstruct(field, mask, g, settings, noise_std=noise_std)
    finally:
        network_io.REFILLS = saved
    nrmse = evaluate_arrays(res.mean, truth, mask, None)["rmse_demeaned"]
    return nrmse, f"{nrmse:.1f} ({res.mean[bleed].mean() / truth[bleed].mean():.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=int, nargs="*", default=list(range(81000, 81006)))
    ap.add_argument("--test", type=int, nargs="*", default=list(LESION_SEEDS) + [0])
    ap.add_argument("--factor", type=float, default=60.0)
    ap.add_argument("--name", default="refill")
    ap.add_argument("--method", default="pdi", choices=("pdi", "pdi-vi1", "pdi-vi2"))
    ap.add_argument("--maps", nargs="+", default=["true", "auto"], choices=("true", "auto"),
                    help="noise maps: the true one, the regions read off the field")
    args = ap.parse_args()
    head = " | ".join(f"{k} refill{'s' if k != 1 else ''}" for k in REFILL_COUNTS)
    lines = [f"| case | set | noise map | {head} |", "|---|---|---|" + "---|" * len(REFILL_COUNTS)]
    sums: dict[tuple[str, str], np.ndarray] = {}
    for role, seeds in (("calibration", args.calibration), ("test", args.test)):
        for seed in seeds:
            name, chi, m, g, field, noise, bleed = case(seed, args.factor) if seed else case(seed)
            maps = {"true": ("true", noise), "auto": ("read off the field", None)}
            for label, nmap in (maps[k] for k in args.maps):
                scored = [run(field, m, g, chi, bleed, nmap, k, args.method) for k in REFILL_COUNTS]
                key = (role if seed else "ICH case", label)
                sums[key] = sums.get(key, np.zeros(len(REFILL_COUNTS) + 1)) + [*(s for s, _ in scored), 1.0]
                lines.append(f"| {name} | {role} | {label} | " + " | ".join(c for _, c in scored) + " |")
                print(lines[-1], flush=True)
    for (role, label), total in sums.items():
        if role != "ICH case":
            means = " | ".join(f"**{v / total[-1]:.2f}**" for v in total[:-1])
            lines.append(f"| mean of {int(total[-1])} | {role} | {label} | {means} |")
    write_table(args.name, "A bleed's unreliable field: predicted by the Tikhonov prior, or by PDI's own first map",
                "Demeaned NRMSE (%) over the brain, the bleed's mean chi over the truth's in brackets; "
                f"{args.method.upper()} with its defaults and 0 or 1 refill; the bleeds' noise {args.factor:g} times "
                "the brain's.\n\n"
                + "\n".join(lines))


if __name__ == "__main__":
    main()
