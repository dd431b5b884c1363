"""Score reconstructions against a truth and print the table (``pdiqsm evaluate``, benchmarks, demo)."""

from __future__ import annotations

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


def format_table(rows: dict[str, dict], columns=COLUMNS) -> str:
    """A Markdown table: one row per reconstruction, the columns that any row has."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    extra = [c for r in rows.values() for c in r if c not in cols and isinstance(r[c], (int, float))]
    cols += list(dict.fromkeys(extra))
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
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
