"""How many iterations PDI-VI needs where its map is kept: accuracy of the everywhere, discrepant and gated maps along
the fine-tuning path, and how far the map still moves (issue 12, PDI-VI's time).

Per brain (the sets of ``benchmarks/vi_where.py``): PDI-VI with every default but ``--vi-where everywhere`` and
``--vi-tol 0`` (one fine-tuning of ``defaults.VI_ITERATIONS`` iterations), the mean map taken every ``EVERY``
iterations; each is blended as the pipeline blends the final one (``weighting.discrepant_region`` of PDI's map, the
gate ``weighting.gated``). Printed per brain and checkpoint: demeaned NRMSE (%) of the everywhere, discrepant and gated
maps, and the relative L2 change over the last ``EVERY`` iterations of the fine-tuned map in the mask, in the kept
region (squared changes weighted by the blend) and of the discrepant map the pipeline would return (PDI's outside the
region). The summary says where the pipeline's convergence test (``vi.MapChange``, tol ``VIConfig().tol``: the map
returned where the map is kept as discrepant, the fine-tuned map otherwise) stops, and the accuracy there of the map
the method's default keeps (gated for PDI-VI1, discrepant for PDI-VI2).
``--cache DIR`` keeps PDI's map and the path's maps (``SEED_pdi.npz``, ``SEED_<method>_path.npz``). ``--tol F``
reads the stop at another tolerance from the same path; ``--vi KEY=VALUE ...`` changes ``VIConfig`` fields of the
fine-tuning (e.g. ``lr=5e-4``, ``tv_start=3 tv_iterations=30``: give it its own cache folder). One thread per run; no
timings.

    python benchmarks/vi_iterations.py [--method pdi-vi2] [--sets ...] [--seeds ...] [--cache DIR] [--name N]
        [--tol F] [--vi KEY=VALUE ...]
        -> benchmarks/results/vi_iterations.md (vi_iterations_vi2.md; or N.md)
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from benchmarks.vi_where import brain_arguments, chosen_sets, load  # noqa: E402
from PDIQSMLib import defaults, vi  # noqa: E402
from PDIQSMLib.inference import paste  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct, vi_where  # noqa: E402
from PDIQSMLib.vi import VIConfig  # noqa: E402
from PDIQSMLib.weighting import (data_weight, discrepant_region, gated, residual_over_cone,  # noqa: E402
                                 weighted_residual)

EVERY = 10  # iterations between the path's maps (vi.CHANGE_WINDOW: the pipeline's convergence test sees the same maps)
SHOWN = (2, 5, 10)  # the checkpoints in the summary: after 20, 50 and 100 iterations


def path_maps(seed: int, method: str, cache: Path | None, changes: dict | None = None
              ) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(the brain, PDI's map, the fine-tuning's mean maps after 0, EVERY, 2 EVERY, ... iterations and the final one);
    ``changes``: ``VIConfig`` fields set for the fine-tuning."""
    data = load(seed)
    chi, mask, g, field, noise = data
    files = [cache / f"{seed}_pdi.npz", cache / f"{seed}_{method}_path.npz"] if cache else [None, None]
    if files[0] and files[0].exists():
        pdi = np.load(files[0])["mean"].astype(np.float64)
    else:
        pdi = reconstruct(field, mask, g, Settings(method="pdi", device="cpu"), noise_std=noise).mean
        if files[0]:
            np.savez(files[0], mean=pdi.astype(np.float32))
    if files[1] and files[1].exists():
        return data, pdi, np.load(files[1])["maps"].astype(np.float64)
    inside, taken, calls = mask > 0, [], [0]
    loss_terms, finetune = vi.loss_terms, vi.finetune

    def traced(mean, logvar, volume, config, noise_level, gen=None):
        if calls[0] % EVERY == 0:  # the map after calls[0] iterations
            with torch.no_grad():
                box = mean[0, 0, :volume.size[0], :volume.size[1], :volume.size[2]].float().cpu().numpy()
            taken.append(paste(box, inside, volume.box))
        calls[0] += 1
        return loss_terms(mean, logvar, volume, config, noise_level, gen)

    def tuning(net, volumes, config, *a, **k):
        return finetune(net, volumes, replace(config, **(changes or {}), tol=0.0), *a, **k)

    vi.loss_terms, vi.finetune = traced, tuning
    try:
        final = reconstruct(field, mask, g, Settings(method=method, device="cpu", vi_where="everywhere"),
                            noise_std=noise).mean
    finally:
        vi.loss_terms, vi.finetune = loss_terms, finetune
    maps = np.stack(taken + [final]).astype(np.float32)
    if files[1]:
        np.savez(files[1], maps=maps)
    return data, pdi, maps.astype(np.float64)


def change(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> float:
    """Relative L2 change from ``a`` to ``b`` weighted by ``weight`` (squared differences weighted, over the norm of
    ``b`` in the mask)."""
    return float(np.sqrt((weight * (b - a) ** 2).sum() / max((b[weight > 0] ** 2).sum(), 1e-30)))


def config_changes(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings as ``VIConfig`` fields, each value of the field's default's type."""
    defaults_, changes = VIConfig(), {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(defaults_, key) or not value:
            raise SystemExit(f"--vi {pair!r}: expected FIELD=VALUE with a VIConfig field")
        default = getattr(defaults_, key)
        if isinstance(default, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = float(value) if default is None else type(default)(value)
    return changes


def main() -> None:
    ap = brain_arguments(__doc__.splitlines()[0], "a folder for each brain's PDI map and fine-tuning path")
    ap.add_argument("--name", help="the table's name under benchmarks/results/ (default: vi_iterations, for PDI-VI2 "
                                   "vi_iterations_vi2)")
    ap.add_argument("--tol", type=float, default=VIConfig().tol, help="the convergence test's tolerance read")
    ap.add_argument("--vi", nargs="*", default=[], metavar="KEY=VALUE", help="VIConfig fields of the fine-tuning")
    args = ap.parse_args()
    changes = config_changes(args.vi)
    sets = chosen_sets(args)
    rule = vi_where(Settings(method=args.method))  # the method's default: gated for PDI-VI1, discrepant for PDI-VI2
    lines = [f"| set | brain | kept | iterations | everywhere | discrepant | default ({rule}) | change, mask | change, kept "
             "| change, returned |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, list] = {}
    for name, seeds in sets.items():
        for seed in seeds:
            (chi, mask, g, field, noise), pdi, maps = path_maps(seed, args.method, args.cache, changes)
            inside, weight = mask > 0, data_weight(mask, noise)
            residual = weighted_residual(field, mask, g, weight, pdi)
            blend = discrepant_region(field, mask, g, weight, pdi, residual=residual)
            choice = gated(residual_over_cone(field, mask, g, weight, residual)) if rule == "gated" else rule
            rows, stop = [], len(maps) - 1
            for k, mu in enumerate(maps):
                its = min(k * EVERY, defaults.VI_ITERATIONS)
                kept = blend * mu + (1 - blend) * pdi
                scores = [nrmse_demeaned(x, chi, inside) for x in (mu, kept, kept if choice == "discrepant" else mu)]
                before = blend * maps[k - 1] + (1 - blend) * pdi
                moved = ([change(maps[k - 1], mu, inside), change(maps[k - 1], mu, blend * inside),
                          change(before, kept, inside)] if k else [np.nan] * 3)
                rows.append(scores)
                if k and k < stop and moved[2 if choice == "discrepant" else 0] < args.tol:
                    stop = k  # where the pipeline stops (vi.MapChange measures the map it returns)
                lines.append(f"| {name} | {seed or 'ICH'} | {choice} | {its} | "
                             + " | ".join(f"{v:.2f}" for v in scores) + " | "
                             + " | ".join("" if np.isnan(v) else f"{v:.4f}" for v in moved) + " |")
                print(lines[-1], flush=True)
            summary.setdefault(name, []).append([nrmse_demeaned(pdi, chi, inside), *[rows[k][2] for k in SHOWN],
                                                 rows[stop][2], min(stop * EVERY, defaults.VI_ITERATIONS)])
    head = ["| set | PDI | " + " | ".join(f"{rule} after {min(k * EVERY, defaults.VI_ITERATIONS)}" for k in SHOWN)
            + f" | {rule}, stopped at tol {args.tol:g} | iterations run |"]
    head.append("|---" * (len(SHOWN) + 4) + "|")
    for name, rows in summary.items():
        mean = np.mean(rows, 0)
        head.append(f"| {name} (mean of {len(rows)}) | " + " | ".join(f"{v:.2f}" for v in mean[:-1])
                    + f" | {mean[-1]:.0f} ({min(r[-1] for r in rows)}-{max(r[-1] for r in rows)}) |")
    name = args.name or "vi_iterations" + ("_vi2" if args.method == "pdi-vi2" else "")
    altered = "".join(f", {k} {v}" for k, v in changes.items())
    write_table(name, f"{args.method.upper()} along its path: where its map is kept, after how many iterations",
                "Demeaned NRMSE (%), bundled model, every default but --vi-where everywhere and --vi-tol 0"
                f"{altered}; the "
                "discrepant and gated maps blend each checkpoint's map as the pipeline blends the final one; change: "
                f"relative L2 over the last {EVERY} iterations, of the fine-tuned map in the mask and in the kept "
                "region, and of the map returned under discrepant; stopped: where the pipeline's test stops (the map "
                "returned where the map is kept as discrepant, the fine-tuned map under everywhere; iterations run "
                "counted at the checkpoint, the pipeline runs one more) (`benchmarks/vi_iterations.py`).\n\n"
                + "\n".join(head) + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
