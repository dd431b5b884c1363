"""Regenerate the extension's assets from the library's own results.

- Resources/Icons/PDIQSM.png (and the module's copy): 128x128, the dipole field pattern of a sphere;
- PDIQSM/Resources/SampleData/: a small simulated phantom (field, mask, true chi) for Slicer's Sample Data;
- Resources/Screenshots/pdi_demo.png: mean and std maps over the field, from the bundled model on a
  simulated brain (real output, no mock-up of a Slicer window).

    python Resources/tools/make_assets.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from PDIQSMLib import phantoms  # noqa: E402
from PDIQSMLib.io import Volume, save_volume  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.simulation import simulated_brain  # noqa: E402


def icon() -> None:
    b = phantoms.sphere_field((128, 128, 1), (1, 1, 1), 18.0, 1.0, (0, 1, 0))[:, :, 0]
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(np.clip(b, -0.25, 0.25).T, cmap="RdBu_r", origin="lower")
    ax.add_patch(plt.Circle((63.5, 63.5), 18, color="0.15"))
    ax.text(63.5, 63.5, "χ±σ", color="white", ha="center", va="center", fontsize=11, weight="bold")
    ax.axis("off")
    for path in (ROOT / "Resources" / "Icons" / "PDIQSM.png", ROOT / "PDIQSM" / "Resources" / "Icons" / "PDIQSM.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_data() -> None:
    vs = (1.5, 1.5, 2.0)
    ph = simulated_brain((96, 112, 64), vs, 40_000, 1e-3)
    field = ph.field
    like = Volume(ph.chi, np.diag(list(vs) + [1.0]), nib.Nifti1Header())
    out = ROOT / "PDIQSM" / "Resources" / "SampleData"
    for name, data in (("field", field), ("mask", ph.mask.astype(np.float32)), ("chi", ph.chi)):
        save_volume(out / f"PDIQSMPhantom_{name}.nii.gz", data, like, f"PDIQSM phantom {name}")


def screenshot() -> None:
    ph = simulated_brain((128, 150, 80), (1.0, 1.0, 1.5), 40_001, 2e-3)
    field = ph.field
    res = reconstruct(field, ph.mask, ph.geometry, Settings(method="pdi", device="cpu"))
    z = field.shape[2] // 2
    fig, axes = plt.subplots(1, 3, figsize=(10, 4))
    panels = [("local field (ppm)", field, "gray", (-0.05, 0.05)), ("PDI mean (ppm)", res.mean, "gray", (-0.15, 0.15))]
    for ax, (title, vol, cmap, (lo, hi)) in zip(axes, panels):
        im = ax.imshow(vol[:, :, z].T, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    ax.imshow(res.mean[:, :, z].T, cmap="gray", vmin=-0.15, vmax=0.15, origin="lower")
    std = np.ma.masked_where(~ph.mask[:, :, z], res.std[:, :, z])
    im = ax.imshow(std.T, cmap="inferno", alpha=0.5, origin="lower", vmin=0, vmax=float(np.percentile(res.std[ph.mask], 99)))
    ax.set_title("PDI std over mean (ppm)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = ROOT / "Resources" / "Screenshots" / "pdi_demo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    icon()
    sample_data()
    screenshot()
