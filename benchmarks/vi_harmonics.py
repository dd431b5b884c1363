"""PDI-VI1 with its data term whole (``--vi-harmonics keep``, the default) or blind to low-order harmonics (``ignore``).

A field that sources outside the brain make is harmonic inside it; to low order (the solid harmonics up to degree 2,
``weighting.solid_harmonics``) it is what an imperfect background removal or a distant source leaves. Fine-tuned on
such a field, PDI-VI fits it into chi; blind to it (``vi.VolumeData.misfit``: the residual projected off the span of
W h) it cannot. But PDI's map may leave a residual there for another reason, a broad error of its own, which
fine-tuning on the whole residual mends. The rows, each PDI-VI1 with every default but ``--vi-harmonics`` (and, for
the first model, ``--vi-where everywhere`` as that set's gate chose it):

- held-out healthy brains (``simulation.realistic_brain``, 1 mm iso) with distant sources' harmonic field of the std
  given (``fieldterms.distant_harmonics`` drawn from the seed + 1, as ``field_offset.py``; 0: none);
- the bleed brains of ``bleed_recovery.py`` (seeds 80000-80005, noise map given);
- ``--first``: realistic calibration brain 32005 with the first, procedural-trained model (``git show
  17f1e57:Resources/models/pdi-default.safetensors``, and its .json, into the path given), whose map leaves a broad
  error (``vi_where_first.md``: fine-tuning everywhere 103.5 -> 61.8 %).

Demeaned NRMSE %, the gate's two readings (``weighting.gate_ratios``) and the seconds of each PDI-VI1 run.
Writes benchmarks/results/vi_harmonics.md (``--name``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_realistic import realistic_config  # noqa: E402
from benchmarks.common import write_table  # noqa: E402
from benchmarks.vi_change import LESION_SEEDS, bleed_brain  # noqa: E402
from PDIQSMLib.fieldterms import distant_harmonics  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.simulation import realistic_brain  # noqa: E402


def cases(args):
    """(set label, seed, chi, mask, geometry, field, noise map or None, extra settings) of each row's brain."""
    for seed in args.healthy:
        s = realistic_brain(seed, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), (144, 144, 96))[0]
        for ppm in args.distant:
            extra = ppm * distant_harmonics(s.mask, s.geometry, np.random.default_rng(seed + 1)) if ppm else 0.0
            field = np.where(s.mask, s.field + extra, 0.0).astype(np.float32)
            yield f"healthy, distant {ppm:g} ppm", seed, s.chi, s.mask, s.geometry, field, None, {}
    for seed in args.bleeds:
        s, chi, field, noise, _ = bleed_brain(seed, realistic_config())
        yield "bleed", seed, chi, s.mask, s.geometry, field, noise, {}
    if args.first:
        from benchmarks.vi_where import load

        chi, mask, g, field, noise = load(32005)
        yield "first model, everywhere", 32005, chi, mask, g, field, noise, {"weights": str(args.first),
                                                                          "vi_where": "everywhere"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--healthy", type=int, nargs="*", default=[31000, 31001, 31002, 31003, 31004])
    ap.add_argument("--distant", type=float, nargs="*", default=[0.0, 0.005], help="distant fields' std (ppm)")
    ap.add_argument("--bleeds", type=int, nargs="*", default=list(LESION_SEEDS))
    ap.add_argument("--first", type=Path, help="the first model's weights file (see above); its row is left out "
                    "without it")
    ap.add_argument("--name", default="vi_harmonics")
    args = ap.parse_args()
    lines = ["| set | brain | PDI | PDI-VI1 keep | PDI-VI1 ignore | kept (gate) | residual / cone (without harmonics) "
             "| seconds keep / ignore |", "|---|---|---|---|---|---|---|---|"]
    sums: dict[str, list[np.ndarray]] = {}
    for label, seed, chi, mask, g, field, noise, extra in cases(args):
        pdi = reconstruct(field, mask, g, Settings(method="pdi", device="cpu", weights=extra.get("weights")),
                          noise_std=noise)
        row, seconds, gate = [nrmse_demeaned(pdi.mean, chi, mask)], [], {}
        for choice in ("keep", "ignore"):
            t0 = time.perf_counter()
            r = reconstruct(field, mask, g, Settings(method="pdi-vi1", device="cpu", vi_harmonics=choice, **extra),
                            noise_std=noise)
            seconds.append(time.perf_counter() - t0)
            row.append(nrmse_demeaned(r.mean, chi, mask))
            gate = r.info["vi_where"]
        ratio = gate.get("gate", {})
        reading = f"{ratio['residual_over_cone']:.2f} ({ratio['without_harmonics']:.2f})" if ratio else "(not gated)"
        lines.append(f"| {label} | {seed} | " + " | ".join(f"{v:.2f}" for v in row)
                     + f" | {gate['kept']} | {reading} | {seconds[0]:.0f} / {seconds[1]:.0f} |")
        print(lines[-1], flush=True)
        sums.setdefault(label, []).append(np.array(row))
    for label, rows in sums.items():
        mean = np.mean(rows, axis=0)
        lines.append(f"| {label} | mean of {len(rows)} | " + " | ".join(f"**{v:.2f}**" for v in mean) + " | | | |")
    write_table(args.name, "PDI-VI1's data term whole or blind to low-order harmonics", __doc__.split("\n\n", 1)[1].strip()
                + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
