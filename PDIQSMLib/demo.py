"""``pdiqsm demo``: simulate a brain, reconstruct it with every method, write maps, a figure and metrics."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from . import defaults
from .evaluation import compare_methods, format_table
from .io import Volume
from .progress import Progress
from .weights import DEFAULT_WEIGHTS

DEMO_SHAPE = (144, 168, 84)  # the largest field of view; the brain at 1.2 x 1.2 x 2 mm fits in it
DEMO_VOXEL = (1.2, 1.2, 2.0)
DEMO_NOISE_PPM = 2e-3  # the procedural fallback's white noise (the realistic brain draws its own terms)
DEMO_SEED_OFFSET = 50_000  # apart from training (one stream from 0), validation (10,000+), calibrations (20,000+,
# 40,000+, 41,000+) and the held-out accuracy brains (31,000+)


def demo_brain(seed: int, shape):
    """(sample, nucleus labels, names, kind): an MNI152 brain with a realistic local field (dipole field plus
    white-matter anisotropy, background residue, correlated noise, mask error) and its deep-nuclei labels;
    without nilearn's templates, a procedural brain with white noise and no labels."""
    from . import anatomy
    from .simulation import realistic_brain, simulated_brain

    if not anatomy.available():
        return simulated_brain(tuple(shape), DEMO_VOXEL, seed, DEMO_NOISE_PPM), None, {}, "procedural brain, white noise"
    sample, labels = realistic_brain(seed, DEMO_VOXEL, max_shape=tuple(shape))
    return sample, labels if labels.any() else None, anatomy.nucleus_names(), "MNI152 brain, realistic field"


def region_comparison(truth, mask, labels, names, results, voxel_size) -> str:
    """Each nucleus's mean relative to the whole-brain mean: the truth beside every method, and PDI's
    95 % interval (the calibrated one when the weights carry a region calibration)."""
    from .regions import error_model_for, region_stats

    rows = {"truth": region_stats(truth, mask, labels, voxel_size, None, names)["rows"]}
    interval = {}
    for method, r in results.items():
        model = error_model_for(r.std is not None, None, r.info.get("weights_sha256"))
        rows[method] = region_stats(r.mean, mask, labels, voxel_size, r.std, names, model=model)["rows"]
        if r.std is not None:
            interval[method] = rows[method]
    head = "| region (ppm, relative to the brain mean) | " + " | ".join(rows) + "".join(
        f" | {m} 95 % interval" for m in interval) + " |"
    lines = [head, "|---" * (len(rows) + len(interval) + 1) + "|"]
    for i, truth_row in enumerate(rows["truth"]):
        cells = [f"{rows[m][i]['mean_ppm']:+.3f}" for m in rows]
        cells += [f"[{rows[m][i]['ci95_low_ppm']:+.3f}, {rows[m][i]['ci95_high_ppm']:+.3f}]" for m in interval]
        lines.append(f"| {truth_row['name'] or truth_row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(out_dir: Path, seed: int = 0, progress: Progress | None = None, shape=DEMO_SHAPE) -> dict:
    """Simulate, reconstruct with every method and publish the whole demo set at once (``outputs.OutputSet``;
    a rerun replaces the demo's own files): the truth ``chi.nii.gz``, ``field.nii.gz``, ``mask.nii.gz`` and
    ``labels.nii.gz``/``labels.tsv`` as ``pdiqsm simulate`` names them, ``field_<method>_chi-mean/-std.nii.gz``
    as ``pdiqsm reconstruct`` names them, ``metrics.md``/``metrics.json``, ``regions.md`` and ``demo.png``."""
    from .outputs import OutputSet
    from .regions import names_tsv

    progress = progress or Progress("none")
    out_dir = Path(out_dir)
    methods = ["tkd", "tikhonov", "medi"] + (["pdi"] if DEFAULT_WEIGHTS.exists() else [])
    paths = {"chi": "chi.nii.gz", "mask": "mask.nii.gz", "field": "field.nii.gz", "labels": "labels.nii.gz",
             "names": "labels.tsv", "table": "metrics.md", "regions": "regions.md", "figure": "demo.png",
             "record": "metrics.json"}
    for method in methods:
        paths[f"{method}-mean"] = f"field_{method}_chi-mean.nii.gz"
        paths[f"{method}-std"] = f"field_{method}_chi-std.nii.gz"
    outputs = OutputSet({k: out_dir / v for k, v in paths.items()}, overwrite=True)
    outputs.check()
    progress.status("simulating a brain")
    ph, labels, names, kind = demo_brain(DEMO_SEED_OFFSET + seed, shape)
    geometry, field = ph.geometry, ph.field
    like = Volume(ph.chi, np.diag(list(geometry.voxel_size) + [1.0]), nib.Nifti1Header())
    rows, results = compare_methods(field, ph.mask, geometry, ph.chi, methods, progress=progress)
    table = format_table(rows)
    regions = region_comparison(ph.chi, ph.mask, labels, names, results, geometry.voxel_size) if labels is not None else None
    with outputs:
        outputs.volume("chi", ph.chi, like, "truth chi ppm")
        outputs.volume("mask", ph.mask.astype(np.float32), like, "mask")
        outputs.volume("field", field, like, "local field ppm")
        if labels is not None:
            outputs.volume("labels", labels.astype(np.float32), like, "nucleus labels")
            outputs.text("names", names_tsv(names))
            outputs.text("regions", regions + "\n")
        for method, res in results.items():
            outputs.volume(f"{method}-mean", res.mean, like, f"{method} chi ppm")
            if res.std is not None:
                outputs.volume(f"{method}-std", res.std, like, f"{method} chi std ppm")
        outputs.text("table", f"{kind}, voxel {geometry.voxel_size} mm, shape {ph.chi.shape}\n\n{table}\n")
        outputs.file("figure", lambda target: save_figure(target, ph.chi, ph.mask, results, geometry.voxel_size))
        outputs.json("record", rows)
        outputs.publish()
    print(f"{kind}, voxel {geometry.voxel_size} mm, shape {ph.chi.shape}\n")
    print(table)
    if regions:
        print("\n" + regions)
    print(f"\nmaps, metrics.md and the figure are in {out_dir.resolve()}\nfigure: {(out_dir / paths['figure']).resolve()}")
    return rows


def save_figure(path: Path, truth: np.ndarray, mask: np.ndarray, results: dict,
                voxel_size=(1.0, 1.0, 1.0)) -> Path:
    """``demo_figure`` written as a PNG."""
    import matplotlib.pyplot as plt

    fig = demo_figure(truth, mask, results, voxel_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def settings_text(results: dict) -> str:
    """What each method ran with, from its result record (lambda and its rule, weights)."""
    parts = []
    for name, r in results.items():
        info = r.info
        if "lambda" in info:
            parts.append(f"{name} lambda {info['lambda']:.2g} ({'auto' if 'lambda_rule' in info else 'fixed'})")
        elif name == "tkd":
            parts.append(f"tkd threshold {defaults.TKD_THRESHOLD:g}")
        elif "weights_sha256" in info:
            parts.append(f"{name} bundled weights {info['weights_sha256'][:8]}")
    return "; ".join(parts)


def demo_figure(truth: np.ndarray, mask: np.ndarray, results: dict, voxel_size=(1.0, 1.0, 1.0)):
    """Orthogonal slices through the centre (rows: axial, coronal, sagittal, in proportion to the voxel
    size; neurological view of RAS volumes: the subject's right on the image's right), columns: the truth,
    each method's mean, and for PDI methods its std and |error| on one shared scale; the title states the
    view and each method's settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(mask) > 0
    panels = [("truth", truth, "gray", (-0.15, 0.15))]
    panels += [(f"{name} mean", r.mean, "gray", (-0.15, 0.15)) for name, r in results.items()]
    for name, r in results.items():
        if r.std is not None:
            error = np.abs(r.mean - truth) * m
            top = float(np.percentile(np.concatenate([r.std[m], error[m]]), 99))  # std and |error| share one scale
            panels.append((f"{name} std", r.std * m, "inferno", (0, top)))
            panels.append((f"{name} |error|", error, "inferno", (0, top)))
    c = [n // 2 for n in truth.shape]
    vx, vy, vz = voxel_size
    rows = [(f"axial z={c[2]}", lambda v: v[:, :, c[2]].T, vy / vx, ("R", "A")),
            (f"coronal y={c[1]}", lambda v: v[:, c[1], :].T, vz / vx, ("R", "S")),
            (f"sagittal x={c[0]}", lambda v: v[c[0], :, :].T, vz / vy, ("A", "S"))]
    fig, axes = plt.subplots(3, len(panels), figsize=(2.4 * len(panels), 7.8), squeeze=False)
    for j, (title, vol, cmap, (lo, hi)) in enumerate(panels):
        for i, (label, cut, aspect, (right, up)) in enumerate(rows):
            ax = axes[i, j]
            im = ax.imshow(cut(vol), cmap=cmap, vmin=lo, vmax=hi, origin="lower", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
                ax.text(0.98, 0.02, right, color="yellow", fontsize=7, ha="right", va="bottom", transform=ax.transAxes)
                ax.text(0.02, 0.98, up, color="yellow", fontsize=7, ha="left", va="top", transform=ax.transAxes)
        axes[0, j].set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", fraction=0.03, pad=0.02, label="ppm")
    fig.suptitle(f"voxel {' x '.join(f'{v:g}' for v in voxel_size)} mm, neurological view (subject's right on the "
                 f"right); {settings_text(results)}", fontsize=9)
    return fig
