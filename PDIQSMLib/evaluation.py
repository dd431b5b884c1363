"""Score reconstructions against a truth and print the table (``pdiqsm evaluate``, benchmarks, demo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import check_same_grid, load_mask, load_volume
from .metrics import all_metrics, calibration

COLUMNS = ("rmse", "rmse_demeaned", "rmse_detrended", "hfen", "ssim", "xsim", "psnr",
           "within_1sigma", "within_2sigma", "spearman_sigma_error")


def evaluate_arrays(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, std: np.ndarray | None = None) -> dict:
    table = all_metrics(recon, truth, mask)
    if std is not None:
        table.update(calibration(recon, std, truth, mask))
    return table


def evaluate_files(recon_path, truth_path, mask_path, std_path=None) -> dict:
    truth = load_volume(truth_path, "truth")
    recon = load_volume(recon_path, "reconstruction")
    check_same_grid(truth, recon, "reconstruction")
    mask = load_mask(mask_path, truth)
    std = None
    if std_path is not None:
        s = load_volume(std_path, "std")
        check_same_grid(truth, s, "std")
        std = s.data
    return evaluate_arrays(recon.data, truth.data, mask, std)


UNITS = {"rmse": "%", "rmse_demeaned": "%", "rmse_detrended": "%", "hfen": "%", "psnr": "dB", "seconds": "s",
         "within_1sigma": "share", "within_2sigma": "share"}


def column_unit(column: str) -> str | None:
    """The unit a table column is in (region means and stds are ppm); None for unitless ones."""
    if column.startswith(("mean_", "std_", "error_")):
        return "ppm"
    return UNITS.get(column)


def format_table(rows: dict[str, dict], columns=COLUMNS) -> str:
    """A Markdown table: one row per reconstruction, the columns that any row has, each with its unit."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    extra = [c for r in rows.values() for c in r if c not in cols and isinstance(r[c], (int, float))]
    cols += list(dict.fromkeys(extra))
    heads = [f"{c} ({column_unit(c)})" if column_unit(c) else c for c in cols]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), (int, float)) else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_methods(field: np.ndarray, mask: np.ndarray, geometry, truth: np.ndarray, methods, noise_std=None,
                    progress=None, regions: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Reconstruct with each method and score it: (rows for ``format_table``, results by method).

    ``methods`` holds method names (default settings) or (row label, Settings) pairs. ``regions`` maps a name to a boolean mask; each row then also gets the mean chi there
    (``mean_<name>``), and for methods with a std map, the mean std there (``std_<name>``).
    """
    from .pipeline import Settings, reconstruct

    rows, results = {}, {}
    for item in methods:
        method, settings = (item, Settings(method=item)) if isinstance(item, str) else item
        res = reconstruct(field, mask, geometry, settings, noise_std=noise_std, progress=progress)
        results[method] = res
        row = {**evaluate_arrays(res.mean, truth, mask, res.std), "seconds": res.info["seconds"]}
        for name, region in (regions or {}).items():
            row[f"mean_{name}"] = float(res.mean[region].mean())
            if res.std is not None:
                row[f"std_{name}"] = float(res.std[region].mean())
        rows[method] = row
    return rows, results


def coverage_curve(mean, std, truth, mask, nominal=None) -> tuple[np.ndarray, np.ndarray]:
    """(nominal, observed): the share of voxels whose |error| lies within the central Gaussian interval of
    each nominal probability (+- z sigma, z = Phi^-1((1 + p) / 2)); calibrated sigma gives the diagonal."""
    from scipy import stats

    nominal = np.linspace(0.05, 0.99, 24) if nominal is None else np.asarray(nominal, dtype=float)
    m = np.asarray(mask) > 0
    err = np.abs(np.asarray(mean, dtype=np.float64)[m] - np.asarray(truth, dtype=np.float64)[m])
    s = np.asarray(std, dtype=np.float64)[m]
    z = stats.norm.ppf((1.0 + nominal) / 2.0)
    return nominal, np.array([np.mean(err <= zi * s) for zi in z])


def calibration_figure(path, mean, std, truth, mask, title: str = "") -> Path:
    """Two panels: observed against nominal coverage of the Gaussian intervals, and the RMS error against
    the mean predicted sigma in ten bins of sigma (both on the diagonal when sigma is calibrated)."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nominal, observed = coverage_curve(mean, std, truth, mask)
    m = np.asarray(mask) > 0
    err = np.asarray(mean, dtype=np.float64)[m] - np.asarray(truth, dtype=np.float64)[m]
    s = np.asarray(std, dtype=np.float64)[m]
    edges = np.unique(np.percentile(s, np.linspace(0, 100, 11)))  # one edge when sigma is constant: one bin
    which = np.digitize(s, edges[1:-1]) if edges.size > 2 else np.zeros(s.size, dtype=int)
    bins = [(s[which == i].mean(), np.sqrt(np.mean(err[which == i] ** 2))) for i in np.unique(which)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    a.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    a.plot(nominal, observed, "o-", ms=3, label="this map")
    a.set(xlabel="nominal coverage of +-z sigma", ylabel="observed share of voxels", xlim=(0, 1), ylim=(0, 1),
          title="coverage (below the diagonal: sigma too small)")
    a.legend(loc="upper left")
    sig, rms = np.array(bins).T
    top = float(max(sig.max(), rms.max())) * 1.05
    b.plot([0, top], [0, top], "k--", lw=1, label="RMS error = sigma")
    b.plot(sig, rms, "o-", ms=4, label="deciles of sigma")
    b.set(xlabel="mean predicted sigma in the bin (ppm)", ylabel="RMS error in the bin (ppm)", xlim=(0, top),
          ylim=(0, top), title="error against sigma")
    b.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90, format=(path.suffix.lstrip(".") or "png"))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
