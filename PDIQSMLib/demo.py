"""``pdiqsm demo``: simulate a brain, reconstruct it with every method, write maps, a figure and metrics."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .evaluation import compare_methods, format_table
from .io import Volume, save_volume, write_json_atomic
from .progress import Progress
from .simulation import simulated_brain
from .weights import DEFAULT_WEIGHTS

DEMO_SHAPE = (128, 150, 80)
DEMO_VOXEL = (1.0, 1.0, 1.5)
DEMO_NOISE_PPM = 2e-3
DEMO_SEED_OFFSET = 20_000  # far from training (one stream from seed 0) and validation (10,000+)


def run_demo(out_dir: Path, seed: int = 0, progress: Progress | None = None) -> dict:
    progress = progress or Progress("none")
    out_dir = Path(out_dir)
    progress.status("simulating a brain phantom")
    ph = simulated_brain(DEMO_SHAPE, DEMO_VOXEL, DEMO_SEED_OFFSET + seed, DEMO_NOISE_PPM)
    geometry, field = ph.geometry, ph.field
    like = Volume(ph.chi, np.diag(list(DEMO_VOXEL) + [1.0]), nib.Nifti1Header())
    save_volume(out_dir / "truth_chi.nii.gz", ph.chi, like, "truth chi ppm")
    save_volume(out_dir / "mask.nii.gz", ph.mask.astype(np.float32), like, "mask")
    save_volume(out_dir / "field.nii.gz", field, like, "local field ppm")
    methods = ["tkd", "tikhonov", "medi"] + (["pdi"] if DEFAULT_WEIGHTS.exists() else [])
    rows, results = compare_methods(field, ph.mask, geometry, ph.chi, methods, progress=progress)
    for method, res in results.items():
        save_volume(out_dir / f"{method}_chi-mean.nii.gz", res.mean, like, f"{method} chi ppm")
        if res.std is not None:
            save_volume(out_dir / f"{method}_chi-std.nii.gz", res.std, like, f"{method} chi std ppm")
    table = format_table(rows)
    (out_dir / "metrics.md").write_text(table + "\n")
    write_json_atomic(out_dir / "metrics.json", rows)
    figure = save_figure(out_dir / "demo.png", ph.chi, ph.mask, results)
    print(table)
    print(f"\nmaps, metrics.md and the figure are in {out_dir.resolve()}\nfigure: {figure.resolve()}")
    return rows


def save_figure(path: Path, truth: np.ndarray, mask: np.ndarray, results: dict) -> Path:
    """Orthogonal slices: truth, each method's mean, and for PDI its std and |error|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("truth", truth, "gray", (-0.15, 0.15))]
    panels += [(f"{m} mean", r.mean, "gray", (-0.15, 0.15)) for m, r in results.items()]
    for m, r in results.items():
        if r.std is not None:
            panels.append((f"{m} std", r.std, "inferno", (0, float(np.percentile(r.std[mask], 99)))))
            panels.append((f"{m} |error|", np.abs(r.mean - truth) * mask, "inferno", (0, 0.1)))
    c = [n // 2 for n in truth.shape]
    fig, axes = plt.subplots(3, len(panels), figsize=(2.4 * len(panels), 7.5), squeeze=False)
    for j, (title, vol, cmap, (lo, hi)) in enumerate(panels):
        views = (vol[:, :, c[2]].T, vol[:, c[1], :].T, vol[c[0], :, :].T)
        for i, view in enumerate(views):
            ax = axes[i, j]
            im = ax.imshow(view, cmap=cmap, vmin=lo, vmax=hi, origin="lower", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", fraction=0.03, pad=0.02, label="ppm")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
