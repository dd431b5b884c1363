"""Region statistics of a susceptibility map, with an interval for each region's mean that accounts for
spatially correlated errors.

What a QSM study reports is the mean chi of regions (nuclei, lesions) relative to a reference. chi is
relative, so every mean here is taken relative to a reference: the mean over the whole mask (default),
a labelled region, or none. For a map with a standard deviation (PDI), the region's mean gets a
posterior standard deviation and a 95 % interval.

Why not ``sqrt(sum sigma^2) / n``: that treats voxel errors as independent, so the interval of a
1000-voxel nucleus would be 30 times narrower than one voxel's, while QSM errors are smooth (streaks,
the unresolved cone, a network's receptive field): neighbouring voxels are wrong together. The model
here: the error of voxel i is ``kappa sigma_i e_i`` with ``corr(e_i, e_j) = exp(-d_ij^2 / (2 l^2))``
(d in mm). For a contrast ``c = w^T chi`` (a region's mean minus the reference's mean) the variance is
``kappa^2 (sigma w)^T K (sigma w)``, computed exactly by one FFT convolution with the kernel K. The
correlation length ``l`` and the factor ``kappa`` are measured on simulated realistic brains never seen
in training (``benchmarks/region_calibration.py``: l from the autocorrelation of the normalised error
e = (mean - truth) / sigma, kappa so that 95 % of the phantoms' true region contrasts fall inside) and
stored beside the weights (``<weights>.regions.json``, tied to their checksum).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from .errors import InputError
from .io import Volume, load_volume

Z95 = 1.959963984540054
REFERENCES = ("whole-brain", "none")  # or a label (number or name)


@dataclass(frozen=True)
class ErrorModel:
    """kappa (scale of sigma) and the correlation length (mm) of the errors; naive: independent voxels."""

    kappa: float = 1.0
    length_mm: float = 0.0
    source: str = "independent voxels (no calibration)"

    @property
    def naive(self) -> bool:
        return self.length_mm <= 0.0


NAIVE = ErrorModel()


def calibration_path(weights_path: Path) -> Path:
    p = Path(weights_path)
    return p.with_name(p.name.replace(".safetensors", "") + ".regions.json")


def _calibrated(record: dict) -> ErrorModel:
    """The error model a calibration file (``benchmarks/region_calibration.py --write``) holds."""
    return ErrorModel(float(record["kappa"]), float(record["length_mm"]), f"calibrated on {record['source']}")


def load_error_model(weights_path: Path | None, sha256: str | None) -> ErrorModel | None:
    """The region calibration stored beside the weights, if it was measured for exactly these weights."""
    if weights_path is None:
        return None
    p = calibration_path(weights_path)
    if not p.exists():
        return None
    record = json.loads(p.read_text())
    if sha256 is not None and record.get("weights_sha256") != sha256:
        return None
    return _calibrated(record)


# -- names and labels ---------------------------------------------------------------------------------

def read_names(path) -> dict[int, str]:
    """Label names from a TSV/CSV with columns index and name (header optional), a JSON object
    {"1": "caudate"} or list [[1, "caudate"]], or a FreeSurfer colour table (index name R G B A)."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "names file does not exist")
    text = p.read_text()
    names: dict[int, str] = {}
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
            items = data.items() if isinstance(data, dict) else data
            names = {int(k): str(v) for k, v in items}
        elif p.suffix.lower() in (".tsv", ".csv"):
            rows = list(csv.reader(text.splitlines(), delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
            for row in rows:
                if not row or row[0].strip().startswith("#"):
                    continue
                if not row[0].strip().lstrip("-").isdigit():
                    continue  # a header
                names[int(row[0])] = row[1].strip()
        else:  # FreeSurfer LUT: whitespace-separated, comments with #
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 2 and parts[0].isdigit():
                    names[int(parts[0])] = parts[1]
    except (ValueError, IndexError, TypeError) as exc:
        raise InputError(str(p), f"cannot read label names ({exc}); expected index and name columns") from None
    if not names:
        raise InputError(str(p), "no label names found (expected lines of index and name)")
    return names


def names_tsv(names: dict[int, str]) -> str:
    """Label names as the TSV ``read_names`` reads (index, name)."""
    return "index\tname\n" + "".join(f"{index}\t{name}\n" for index, name in names.items())


def load_labels(path, ref: Volume) -> tuple[np.ndarray, str | None]:
    """Integer labels on ``ref``'s grid and a note when they were resampled. Same grid: used as they are.
    Another sampling of the same space (different shape or voxel size, overlapping field of view):
    resampled by nearest neighbour, and the note says so. 4D files, non-integer values, and grids that do
    not overlap are refused."""
    vol = load_volume(path, "labels")
    data = vol.data
    if not np.allclose(data, np.round(data)):
        raise InputError(str(path), "labels must be whole numbers (a label image, not a probability map or a field)")
    labels = np.round(data).astype(np.int64)
    if labels.shape == ref.data.shape and np.allclose(vol.affine, ref.affine, atol=1e-4, rtol=1e-5):
        return labels, None
    # world -> label voxel for every voxel of ref
    to_label = np.linalg.inv(vol.affine) @ ref.affine
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in ref.data.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    idx = np.rint(grid @ to_label[:3, :3].T + to_label[:3, 3]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(labels.shape)), axis=1)
    if inside.mean() < 0.5:
        raise InputError(str(path), f"labels cover only {100 * inside.mean():.0f} % of the field's grid (shape "
                                    f"{labels.shape} vs {ref.data.shape}, different affines): not the same space")
    out = np.zeros(len(grid), np.int64)
    out[inside] = labels[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
    note = (f"{path}: labels on another grid (shape {labels.shape}, voxel {vol.voxel_size} mm) were resampled to the "
            f"field's ({ref.data.shape}, {ref.voxel_size} mm) by nearest neighbour")
    return out.reshape(ref.data.shape), note


# -- the error covariance ---------------------------------------------------------------------------

def _kernel(length_mm: float, voxel_size, extent) -> np.ndarray:
    """K(d) = exp(-|d|^2 / (2 l^2)) on the voxel grid, out to 4 l or to the ``extent`` (voxels) of the data
    it is convolved with, whichever is shorter (farther lags pair no voxels)."""
    half = [min(max(int(math.ceil(4.0 * length_mm / h)), 0), n - 1) for h, n in zip(voxel_size, extent)]
    axes = [np.arange(-n, n + 1) * h for n, h in zip(half, voxel_size)]
    d2 = sum(np.meshgrid(*[a**2 for a in axes], indexing="ij"))
    return np.exp(-d2 / (2.0 * length_mm**2))


def contrast_std(weights: np.ndarray, std: np.ndarray, model: ErrorModel, voxel_size) -> float:
    """Standard deviation of ``sum(weights * chi)`` under the error model (exact Gaussian quadratic form)."""
    v = np.asarray(weights, np.float64) * np.asarray(std, np.float64)
    if model.naive:
        return float(model.kappa * np.sqrt(np.sum(v**2)))
    nz = np.argwhere(v != 0)
    if nz.size == 0:
        return 0.0
    lo, hi = nz.min(0), nz.max(0) + 1
    k = _kernel(model.length_mm, voxel_size, hi - lo)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = v[box]
    smoothed = signal.fftconvolve(sub, k, mode="same")
    return float(model.kappa * np.sqrt(max(float(np.sum(sub * smoothed)), 0.0)))


class ContrastVariance:
    """Standard deviations of many contrasts ``region mean - reference mean`` sharing one reference:
    (u - v)^T K (u - v) = u K u - 2 u K v + v K v with the reference's K (sigma v) computed once (one
    FFT over the reference), so that each region costs a convolution over its own box only."""

    def __init__(self, std: np.ndarray, model: ErrorModel, voxel_size, reference_weights: np.ndarray) -> None:
        self.std, self.model, self.voxel_size = np.asarray(std, np.float64), model, voxel_size
        self.reference_weights = np.asarray(reference_weights, np.float64)
        self.v = self.reference_weights * self.std
        if model.naive or not self.v.any():
            self.kv, self.vkv = None, float(np.sum(self.v**2))
            return
        nz = np.argwhere(self.v != 0)
        lo, hi = nz.min(0), nz.max(0) + 1
        self.box = tuple(slice(a, b) for a, b in zip(lo, hi))
        k = _kernel(model.length_mm, voxel_size, hi - lo)
        self.kv = np.zeros_like(self.v)
        self.kv[self.box] = signal.fftconvolve(self.v[self.box], k, mode="same")
        self.vkv = float(np.sum(self.v[self.box] * self.kv[self.box]))

    def __call__(self, region_weights: np.ndarray) -> float:
        u = np.asarray(region_weights, np.float64) * self.std
        if self.model.naive:
            return float(self.model.kappa * np.sqrt(max(np.sum((u - self.v) ** 2), 0.0)))
        if self.kv is None:
            return contrast_std(region_weights, self.std, self.model, self.voxel_size)
        nz = np.argwhere(u != 0)
        lo, hi = nz.min(0), nz.max(0) + 1
        inside = all(a >= b.start and c <= b.stop for a, c, b in zip(lo, hi, self.box))
        if not inside:  # a region reaching outside the reference's box: the direct form
            return contrast_std(region_weights - self.reference_weights, self.std, self.model, self.voxel_size)
        ukv = float(np.sum(u * self.kv))
        uku = contrast_std(region_weights, self.std, ErrorModel(1.0, self.model.length_mm), self.voxel_size) ** 2
        return float(self.model.kappa * np.sqrt(max(uku - 2.0 * ukv + self.vkv, 0.0)))


def correlated_samples(std: np.ndarray, model: ErrorModel, voxel_size, count: int, rng: np.random.Generator):
    """``count`` error fields kappa sigma e with corr(e) = the model's kernel (white noise smoothed by a
    Gaussian of l / sqrt 2, scaled to unit variance)."""
    from scipy import ndimage

    for _ in range(count):
        e = rng.standard_normal(std.shape)
        if not model.naive:
            e = ndimage.gaussian_filter(e, [model.length_mm / math.sqrt(2.0) / h for h in voxel_size], mode="wrap")
            e /= e.std()
        yield model.kappa * std * e


# -- the table --------------------------------------------------------------------------------------

COLUMNS = ("label", "name", "voxels", "volume_ml", "mean_ppm", "median_ppm", "spread_ppm", "std_of_mean_ppm",
           "ci95_low_ppm", "ci95_high_ppm", "std_of_mean_independent_ppm", "voxels_outside_mask")


def present_labels(labels: np.ndarray, mask: np.ndarray, source: str = "labels") -> list[int]:
    """The labels (> 0) with a voxel inside ``mask``; InputError naming ``source`` (the label file) when none has."""
    present = [int(v) for v in np.unique(labels[np.asarray(mask) > 0]) if v > 0]
    if not present:
        raise InputError(source, "no label (> 0) has a voxel inside the mask")
    return present


def resolve_reference(reference, names: dict[int, str], present: list[int]) -> int | str:
    """'whole-brain', 'none', or a label number (given as a number or a name)."""
    ref = str(reference)
    if ref in REFERENCES:
        return ref
    if ref.lstrip("-").isdigit():
        value = int(ref)
    else:
        found = [k for k, v in names.items() if v.lower() == ref.lower()]
        if not found:
            raise InputError("--reference", f"{ref!r} is neither whole-brain, none, a label number nor a label name")
        value = found[0]
    if value not in present:
        raise InputError("--reference", f"label {value} has no voxel inside the mask")
    return value


def region_stats(chi: np.ndarray, mask: np.ndarray, labels: np.ndarray, voxel_size, std: np.ndarray | None = None,
                 names: dict[int, str] | None = None, reference="whole-brain", model: ErrorModel | None = None,
                 samples: int = 0, seed: int = 0, source: str = "labels") -> dict:
    """The table of every label (> 0) inside the mask; returns {"rows": [...], "reference": ..., notes}; InputError
    naming ``source`` (the label file) when no label has a voxel inside the mask.

    Means, medians and the interval are relative to the reference (its own uncertainty included, and its
    covariance with the region when they overlap). ``samples`` > 0: the interval is also read off that
    many correlated error samples (``std_of_mean_sampled_ppm``), a check on the closed form."""
    names = names or {}
    m = np.asarray(mask) > 0
    chi = np.asarray(chi, np.float64)
    model = model or NAIVE
    present = present_labels(labels, m, source)
    all_labels = [int(v) for v in np.unique(labels) if v > 0]
    notes = []
    empty = [v for v in all_labels if v not in present]
    if empty:
        notes.append(f"labels with no voxel inside the mask (left out): {', '.join(map(str, empty))}")
    ref = resolve_reference(reference, names, present)
    if ref == "whole-brain":
        ref_weights, ref_text = m / m.sum(), "mean over the whole mask"
    elif ref == "none":
        ref_weights, ref_text = np.zeros(chi.shape), "none (values as reconstructed)"
    else:
        region = m & (labels == ref)
        ref_weights, ref_text = region / region.sum(), f"mean of label {ref} ({names.get(ref, 'unnamed')})"
    ref_value = float(np.sum(ref_weights * chi))
    voxel_ml = float(np.prod(voxel_size)) / 1000.0
    rng = np.random.default_rng(seed)
    drawn = list(correlated_samples(np.asarray(std, np.float64), model, voxel_size, samples, rng)) if (
        std is not None and samples > 0) else []
    variance = ContrastVariance(std, model, voxel_size, ref_weights) if std is not None else None
    rows = []
    for label in present:
        region = m & (labels == label)
        n = int(region.sum())
        values = chi[region] - ref_value
        row = {"label": label, "name": names.get(label, ""), "voxels": n, "volume_ml": n * voxel_ml,
               "mean_ppm": float(values.mean()), "median_ppm": float(np.median(values)),
               "spread_ppm": float(values.std()), "voxels_outside_mask": int(np.sum((labels == label) & ~m))}
        if std is not None:
            weights = region / n - ref_weights
            sd = variance(region / n)
            row.update(std_of_mean_ppm=sd, ci95_low_ppm=row["mean_ppm"] - Z95 * sd,
                       ci95_high_ppm=row["mean_ppm"] + Z95 * sd,
                       std_of_mean_independent_ppm=contrast_std(weights, std, NAIVE, voxel_size))
            if drawn:
                row["std_of_mean_sampled_ppm"] = float(np.std([np.sum(weights * e) for e in drawn]))
        rows.append(row)
    if std is None:
        return {"reference": ref_text, "reference_value_ppm": ref_value,
                "error_model": "none: no standard deviation map (this method gives no interval)", "kappa": None,
                "correlation_length_mm": None, "rows": rows, "notes": notes}
    return {"reference": ref_text, "reference_value_ppm": ref_value, "error_model": model.source,
            "kappa": model.kappa, "correlation_length_mm": model.length_mm, "rows": rows, "notes": notes}


def table_tsv(stats: dict) -> str:
    """The table as TSV, with the reference and the error model in comment lines above it."""
    rows = stats["rows"]
    columns = [c for c in COLUMNS if any(c in r for r in rows)] + sorted({k for r in rows for k in r} - set(COLUMNS))
    lines = [f"# reference: {stats['reference']} ({stats['reference_value_ppm']:.5f} ppm subtracted)",
             f"# interval: {stats['error_model']}" + ("" if stats["kappa"] is None else
                                                        f" (kappa {stats['kappa']:.3g}, correlation length "
                                                        f"{stats['correlation_length_mm']:.3g} mm)")]
    lines += [f"# {n}" for n in stats["notes"]]
    lines.append("\t".join(columns))
    for r in rows:
        lines.append("\t".join(_cell(r.get(c)) for c in columns))
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def cohort_tsv(tables: dict[str, dict], column: str = "mean_ppm") -> str:
    """One row per region, one column per subject: ``column`` of each subject's table."""
    regions: dict[tuple[int, str], dict[str, float]] = {}
    for subject, stats in tables.items():
        for r in stats["rows"]:
            regions.setdefault((r["label"], r["name"]), {})[subject] = r.get(column)
    subjects = list(tables)
    lines = ["\t".join(["label", "name"] + subjects)]
    for (label, name), values in sorted(regions.items()):
        lines.append("\t".join([str(label), name] + [_cell(values.get(s)) for s in subjects]))
    return "\n".join(lines) + "\n"


# -- files ------------------------------------------------------------------------------------------

def error_model_for(std_available: bool, weights_path=None, sha256: str | None = None, calibration=None,
                    independent: bool = False, method: str = "pdi") -> ErrorModel | None:
    """The error model of a PDI std map: a given calibration file, else the one stored beside the
    weights that made the map (bundled by default) when it matches their checksum, else independent
    voxels (say so: the interval is then far too narrow). None when there is no std map. The stored
    calibration was measured for PDI; for a PDI-VI ``method`` its description says it is too narrow there."""
    if not std_available:
        return None
    if independent:
        return NAIVE
    if calibration is not None:
        record = json.loads(Path(calibration).read_text())
        return _calibrated(record)
    from .weights import DEFAULT_WEIGHTS

    model = load_error_model(Path(weights_path) if weights_path else DEFAULT_WEIGHTS, sha256)
    if model is None:
        return ErrorModel(1.0, 0.0, "independent voxels: no region calibration for these weights (the interval "
                                    "is too narrow; see benchmarks/region_calibration.py)")
    if method.startswith("pdi-vi"):
        return ErrorModel(model.kappa, model.length_mm, model.source + "; measured for PDI, too narrow for PDI-VI "
                                                                      "(52 % coverage on 3 test brains, benchmarks/"
                                                                      "results/region_calibration_vi2.md)")
    return model


def stats_for_files(chi: Volume, mask: np.ndarray, labels_path, std: np.ndarray | None = None, names_path=None,
                    reference="whole-brain", model: ErrorModel | None = None, samples: int = 0) -> dict:
    """``region_stats`` for a map read from disk, with the labels (resampled when on another sampling) and
    names read here; the notes say what was done."""
    labels, note = load_labels(labels_path, chi)
    names = read_names(names_path) if names_path else default_names(labels_path)
    stats = region_stats(chi.data, mask, labels, chi.voxel_size, std, names, reference, model, samples,
                         source=str(labels_path))
    if note:
        stats["notes"].insert(0, note)
    return stats


def default_names(labels_path) -> dict[int, str]:
    """Names from a ``<labels>.tsv`` (or ``labels.tsv``) beside the label file, if there is one."""
    from .io import nifti_stem

    p = Path(labels_path)
    for candidate in (p.with_name(nifti_stem(p) + ".tsv"), p.with_name("labels.tsv")):
        if candidate.exists():
            return read_names(candidate)
    return {}


def read_table_tsv(path) -> list[dict]:
    """Rows of a table written by ``table_tsv`` (comment lines skipped; numbers as numbers)."""
    lines = [x for x in Path(path).read_text().splitlines() if x and not x.startswith("#")]
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        row = {}
        for key, cell in zip(header, line.split("\t")):
            try:
                row[key] = int(cell) if key in ("label", "voxels", "voxels_outside_mask") else float(cell)
            except ValueError:
                row[key] = cell
        rows.append(row)
    return rows
