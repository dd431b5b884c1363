"""Where PDI-VI1 adds error on the brains it harms, and what could keep it from fitting the non-dipolar field into
chi: accuracy only, nothing here is built into the library.

On the held-out brains 31003 and 31009 PDI-VI1 is 12-13 points worse than PDI (``vi_change_heldout10_swa.md``).
``diagnose SEED...`` runs PDI and PDI-VI1 with their defaults and splits the rise of the squared error (demeaned maps,
VI1 minus PDI, over PDI's total) by the voxels' distance to the mask's edge and by the truth's value. Variants of
PDI-VI1's data misfit ``||W (D chi - b)||^2`` (``vi.VolumeData.misfit`` replaced for the run):

- ``taper D``: W times min(1, d / D), d (mm) the distance to the nearest voxel outside the mask: the edge, where the
  background-field residue and a mask's misses lie, trusted less (``vi.prepare`` wrapped);
- ``highpass S``: the residual r = W (D chi - b) high-passed inside the mask before it is squared,
  r - G(r m) / G(m), G a Gaussian of S mm: smooth residue, such as the harmonic background left near the edge, is
  then not fitted into chi (the closed-form variance term still uses diag(D^T W^2 D): an approximation);
- ``anchor A``: the loss plus A sum_j (mu_j - mu0_j)^2 / (2 sigma0_j^2), mu0 and sigma0 the network's own first
  output on the field (PDI's one-pass map and sigma): PDI's posterior as a Gaussian prior on the fine-tuned mean, A
  its weight (1: that prior's KL term for the mean; the data term is read at the white noise level, several times
  below what no map explains on a real field, so it outweighs such a prior unless A is larger).

Each prints a line per brain: PDI's and PDI-VI1's demeaned NRMSE (%). Brains: ``realistic_config()`` seeds as
``bench_realistic.py``, seed 0 the ICH case (its noise map). Runs of one thread side by side: no timings.

    python benchmarks/vi_harm.py diagnose 31003 31009
    python benchmarks/vi_harm.py taper 3 20000 ...        (session 31: D 0 (default), 3, 6 on 20000-20003)
    python benchmarks/vi_harm.py highpass 4 32000 ...     (session 31: S 0 (default), 4 on 32000-32005)
    python benchmarks/vi_harm.py anchor 10 32000 ...      (session 31: A 1, 10, 30 on 32000-32005 and 0)
Results: benchmarks/results/vi_harm.md (written by hand from the printed lines).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.vi_trace import brain  # noqa: E402  (realistic_config()'s brains, seed 0 the ICH case)
from PDIQSMLib import vi  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402


def blur(x: torch.Tensor, voxel_size, sigma_mm: float) -> torch.Tensor:
    """A separable Gaussian of ``sigma_mm`` over a (1, 1, X, Y, Z) tensor, zero outside."""
    for axis, h in enumerate(voxel_size):
        s = sigma_mm / h
        r = max(1, int(3 * s))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / s) ** 2)
        shape, pad = [1, 1, 1, 1, 1], [0] * 6
        shape[2 + axis] = 2 * r + 1
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad), (k / k.sum()).view(shape))
    return x


def use_taper(edge_mm: float) -> None:
    prepare = vi.prepare

    def tapered(field_ppm, mask, geometry, *args, **kwargs):
        v = prepare(field_ppm, mask, geometry, *args, **kwargs)
        d = ndimage.distance_transform_edt(np.asarray(mask) > 0, sampling=geometry.voxel_size)
        t = np.minimum(1.0, d / edge_mm)[v.box].astype(np.float32)
        t = np.pad(t, [(0, n - k) for n, k in zip(v.weight.shape[-3:], t.shape)])
        v.weight = v.weight * torch.from_numpy(t)[None, None].to(v.weight.device)
        return v

    vi.prepare = tapered


def use_highpass(sigma_mm: float) -> None:
    smooth_mask: dict[int, torch.Tensor] = {}

    def misfit(self, chi):
        r = self.weight * (self.op.forward(chi) - self.field) * self.mask
        vs = self.geometry.voxel_size
        if id(self) not in smooth_mask:
            smooth_mask[id(self)] = blur(self.mask.float(), vs, sigma_mm).clamp_min(1e-3)
        return ((self.mask * (r - blur(r, vs, sigma_mm) / smooth_mask[id(self)])) ** 2).sum()

    vi.VolumeData.misfit = misfit


def use_anchor(weight: float) -> None:
    first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    expected_kl = vi.expected_kl

    def anchored(mean, logvar, data, lam, noise_level, misfit=None):
        out = expected_kl(mean, logvar, data, lam, noise_level, misfit)
        if id(data) not in first:  # the first call: the base network's output
            first[id(data)] = mean.detach().float().clone(), torch.exp(logvar.detach().float())
        mu0, var0 = first[id(data)]
        out["loss"] = out["loss"] + weight * (data.mask * (mean.float() - mu0) ** 2 / (2 * var0)).sum()
        return out

    vi.expected_kl = anchored


def scores(seed: int):
    s, noise_std = brain(seed)
    maps = {m: reconstruct(s.field, s.mask, s.geometry, Settings(method=m, device="cpu"), noise_std=noise_std).mean
            for m in ("pdi", "pdi-vi1")}
    return s, maps


def diagnose(seed: int) -> None:
    s, maps = scores(seed)
    m, t = s.mask > 0, s.chi
    err = {k: (v - v[m].mean()) - (t - t[m].mean()) for k, v in maps.items()}
    rise = np.where(m, err["pdi-vi1"] ** 2 - err["pdi"] ** 2, 0.0)
    total = (err["pdi"][m] ** 2).sum()

    def row(label: str, sel: np.ndarray, last: str = "| | |") -> None:
        print(f"| {seed} | {label} | {sel.sum() / m.sum():.3f} | {rise[sel].sum() / total:+.3f} {last}")

    row("all", m, f"| {nrmse_demeaned(maps['pdi'], t, m):.1f} | {nrmse_demeaned(maps['pdi-vi1'], t, m):.1f} |")
    dist = ndimage.distance_transform_edt(m, sampling=s.geometry.voxel_size)
    for lo, hi in ((0, 2), (2, 5), (5, 10), (10, np.inf)):
        sel = m & (dist > lo) & (dist <= hi)
        rms = [np.sqrt((err[k][sel] ** 2).mean()) for k in ("pdi", "pdi-vi1")]
        row(f"{lo}-{hi} mm from the edge", sel, f"| {rms[0]:.4f} ppm | {rms[1]:.4f} ppm |")
    for lo, hi in ((-np.inf, -0.05), (-0.05, 0.05), (0.05, 0.15), (0.15, np.inf)):
        row(f"truth {lo:g} to {hi:g} ppm", m & (t > lo) & (t <= hi))
    worst = np.zeros_like(m)
    worst[m] = rise[m] >= np.sort(rise[m])[-(m.sum() // 100)]
    row("the 1 % of voxels whose error rose most", worst)


def main() -> None:
    mode = sys.argv[1]
    if mode == "diagnose":
        print("| brain | voxels | share of the mask | rise of squared error / PDI's | PDI | PDI-VI1 |")
        for seed in sys.argv[2:]:
            diagnose(int(seed))
        return
    value, seeds = float(sys.argv[2]), [int(a) for a in sys.argv[3:]]
    if value > 0:
        {"taper": use_taper, "highpass": use_highpass, "anchor": use_anchor}[mode](value)
    for seed in seeds:
        s, maps = scores(seed)
        m = s.mask > 0
        print(mode, value, seed, f"pdi {nrmse_demeaned(maps['pdi'], s.chi, m):.2f}",
              f"vi1 {nrmse_demeaned(maps['pdi-vi1'], s.chi, m):.2f}", flush=True)


if __name__ == "__main__":
    main()
