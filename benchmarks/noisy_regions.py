"""A bleed's field without its noise map: trusting every voxel, the noisy regions read off the field, the true map.

An acute bleed's phase is noise; a pipeline that gives no noise map (most do not) hands PDI and MEDI a field whose
bleed is noise tens to hundreds of times the brain's. ``weighting.noisy_regions`` (``--noisy-regions auto``, the
default without ``--noise-std``) finds such regions in the field itself. Three sets, each method with its defaults:

- calibration, realistic bleed brains of seeds 81000+ (``vi_change.bleed_brain``: a realistic brain, an acute bleed
  with partial volume at its edge, noise 20 times the field's level inside; apart from every other seed range): PDI
  with the region eroded by 0, 1 or 2 voxels (the choice of ``erode``; the rim check made), trusting every voxel
  ('off') and with the true noise map;
- test, the six bleed brains of the other benchmarks (80000-80005) and the shared ICH case (noise map 800 times the
  brain's in the bleed, a noisy halo): PDI and MEDI off, auto and with the true map;
- healthy brains, the ten held-out realistic brains (31000-31009) and the six whole brains at 1.06 mm of
  ``iso_grid.py`` (34000+): how many voxels auto marks (none means every method's map is unchanged).

Per case: demeaned NRMSE (%) over the brain and the bleed's mean chi as a share of the truth's; the voxels marked in
the bleed and outside it. No timings.

    python benchmarks/noisy_regions.py [--calibration 81000 ...] [--test 80000 ... 0] [--name noisy_regions]
    python benchmarks/noisy_regions.py --loud 60 200 --name noisy_regions_loud   (bleeds 60 and 200 times the brain's)
    (seed 0: the ICH case)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_realistic import SEEDS, realistic_config  # noqa: E402
from benchmarks.common import ich_bleed, ich_case, write_table  # noqa: E402
from benchmarks.vi_change import LESION_SEEDS, bleed_brain  # noqa: E402
from PDIQSMLib import simulation  # noqa: E402
from PDIQSMLib.simulation import BLEED_NOISE_FACTOR  # noqa: E402
from PDIQSMLib.evaluation import evaluate_arrays  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.weighting import noisy_regions  # noqa: E402


def case(seed: int, noise_factor: float = BLEED_NOISE_FACTOR):
    """(name, truth, mask, geometry, field, true noise map, bleed); the bleed's noise ``noise_factor`` times the
    brain's (seed 0: the ICH case, its own noise map)."""
    if seed == 0:
        chi, mask, noise, g, field = ich_case()
        return "ICH case", chi, mask > 0, g, field, noise, ich_bleed(chi, mask)
    s, chi, field, noise, bleed = bleed_brain(seed, realistic_config(), noise_factor)
    return f"bleed brain {seed}", chi, s.mask > 0, s.geometry, field, noise, bleed


def loud(calibration, test, factors, name: str) -> None:
    """Bleeds whose noise is 20-200 times the brain's (the physics: a void's phase is uniform, about 1.8 SNR times the
    brain's noise; the ICH case's map: 800): the region without and with its rim check (``weighting.rim_check``). A
    case where both mark the same voxels gives the same maps: run once."""
    lines = ["| case | noise factor | region's median ratio | marked, no rim check | marked (default) "
             "| PDI no rim check | PDI (default) | PDI true map | MEDI no rim check | MEDI (default) | MEDI true map |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for role, seeds in (("calibration", calibration), ("test", test)):
        for seed in seeds:
            for factor in (factors if seed else [0]):
                label, chi, m, g, field, noise, bleed = case(seed, factor or BLEED_NOISE_FACTOR)
                before, after = noisy_regions(field, m, rim=False), noisy_regions(field, m)
                same = (before is None and after is None) or (
                    before is not None and after is not None and np.array_equal(before, after))
                cells = [f"{np.median(before[before > 1]):.0f}" if before is not None else "-",
                         marked(before, m, bleed), marked(after, m, bleed)]
                for method in ("pdi", "medi"):
                    old = score(method, field, m, g, chi, bleed, before) if before is not None else "(none)"
                    new = old if same else score(method, field, m, g, chi, bleed, after)
                    cells += [old, new, score(method, field, m, g, chi, bleed, noise)]
                lines.append(f"| {label} ({role}) | {factor or 800:g} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    write_table(name, "Loud bleeds without their noise map: the noisy region's rim check",
                "Demeaned NRMSE (%) over the brain, the bleed's mean chi over the truth's in brackets; marked: voxels "
                "of the bleed / outside it.\n\n" + "\n".join(lines))


def score(method, field, mask, g, truth, bleed, noise_std=None, auto=False) -> str:
    settings = Settings(method=method, device="cpu", noisy_regions="auto" if auto else "off")
    res = reconstruct(field, mask, g, settings, noise_std=noise_std)
    nrmse = evaluate_arrays(res.mean, truth, mask, None)["rmse_demeaned"]
    return f"{nrmse:.1f} ({res.mean[bleed].mean() / truth[bleed].mean():.2f})"


def marked(found, mask, bleed) -> str:
    hot = np.zeros(mask.shape, bool) if found is None else found > 1
    return f"{int((hot & bleed).sum())} of {int(bleed.sum())} / {int((hot & ~bleed).sum())}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=int, nargs="*", default=None,
                    help="calibration bleed brains (default 81000-81005; with --loud 81000 81002 81004)")
    ap.add_argument("--test", type=int, nargs="*", default=list(LESION_SEEDS) + [0])
    ap.add_argument("--healthy", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--iso", type=int, nargs="*", default=list(range(34000, 34006)))
    ap.add_argument("--name", default="noisy_regions")
    ap.add_argument("--loud", type=float, nargs="*", default=None,
                    help="noise factors: run only the loud-bleed table (calibration 81000 81002 81004 by default)")
    args = ap.parse_args()
    if args.loud is not None:
        calibration = [81000, 81002, 81004] if args.calibration is None else args.calibration
        loud(calibration, args.test, args.loud or [60.0, 200.0], args.name)
        return
    if args.calibration is None:
        args.calibration = list(range(81000, 81006))
    parts = ["Demeaned NRMSE (%) over the brain, with the bleed's mean chi over the truth's in brackets; marked: voxels "
             "of the bleed / outside it that the field's noisy regions hold."]
    lines = ["| calibration brain | marked (erode 0) | marked (erode 1, default) | PDI off | erode 0 | erode 1 (default) "
             "| erode 2 | true noise map |", "|---|---|---|---|---|---|---|---|"]
    for seed in args.calibration:
        name, chi, m, g, field, noise, bleed = case(seed)
        cells = [marked(noisy_regions(field, m, 0), m, bleed), marked(noisy_regions(field, m), m, bleed),
                 score("pdi", field, m, g, chi, bleed)]
        for erode in (0, 1, 2):
            found = noisy_regions(field, m, erode)
            cells.append(score("pdi", field, m, g, chi, bleed, found) if found is not None else "(none marked)")
        cells.append(score("pdi", field, m, g, chi, bleed, noise))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    parts.append("\n".join(lines))
    lines = ["| test case | marked | PDI off | PDI auto (default) | PDI true map | MEDI off | MEDI auto (default) | "
             "MEDI true map |", "|---|---|---|---|---|---|---|---|"]
    for seed in args.test:
        name, chi, m, g, field, noise, bleed = case(seed)
        cells = [marked(noisy_regions(field, m), m, bleed)]
        for method in ("pdi", "medi"):
            cells += [score(method, field, m, g, chi, bleed), score(method, field, m, g, chi, bleed, auto=True),
                      score(method, field, m, g, chi, bleed, noise)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    parts.append("\n".join(lines))
    lines = ["| healthy brain | grid | voxels marked |", "|---|---|---|"]
    for seed in args.healthy:
        s = simulation.make_volume(np.random.default_rng(seed), realistic_config())
        found = noisy_regions(s.field, s.mask)
        grid = " x ".join(f"{v:.2f}" for v in s.geometry.voxel_size)
        lines.append(f"| held-out {seed} | {grid} | {0 if found is None else int((found > 1).sum())} |")
        print(lines[-1], flush=True)
    for seed in args.iso:
        s, _ = simulation.realistic_brain(seed, (1.06, 1.06, 1.06), max_shape=(160, 160, 160))
        found = noisy_regions(s.field, s.mask)
        lines.append(f"| whole brain {seed} | 1.06 isotropic | {0 if found is None else int((found > 1).sum())} |")
        print(lines[-1], flush=True)
    parts.append("\n".join(lines))
    write_table(args.name, "A bleed's field without its noise map: noisy regions read off the field", "\n\n".join(parts))


if __name__ == "__main__":
    main()
