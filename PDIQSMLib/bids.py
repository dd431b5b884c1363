"""BIDS-style derivative names and sidecars, and finding subjects' inputs in a folder tree.

A susceptibility map is named by the input's entities with the suffix ``Chimap`` (the BIDS suffix
for susceptibility maps); the standard deviation map carries ``desc-std``. The JSON sidecar holds
the units, the method, its settings and the software version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .io import nifti_stem

ENTITY = re.compile(r"^[a-zA-Z0-9]+-[a-zA-Z0-9]+$")


def entities_prefix(field_path) -> str:
    """The input's ``key-value`` entities, in order, without its suffix (``sub-01_ses-2_..._localfield`` ->
    ``sub-01_ses-2_...``); a name without entities is kept whole."""
    parts = nifti_stem(Path(field_path)).split("_")
    kept = [p for p in parts if ENTITY.match(p) and not p.startswith("desc-")]
    return "_".join(kept) if kept else nifti_stem(Path(field_path))


def bids_names(field_path) -> dict[str, str]:
    prefix = entities_prefix(field_path)
    return {"mean": f"{prefix}_Chimap.nii.gz", "std": f"{prefix}_desc-std_Chimap.nii.gz",
            "record": f"{prefix}_Chimap.json"}


def sidecar(record: dict) -> dict:
    """A BIDS-style JSON sidecar from a run record."""
    settings = record["settings"]
    return {
        "Units": "ppm",
        "Description": "magnetic susceptibility (posterior mean)" + (" and standard deviation (desc-std)" if len(record["outputs"]) > 1 else ""),
        "Method": settings["method"],
        "MethodSettings": {k: v for k, v in settings.items() if v is not None},
        "MagneticFieldStrength": record.get("b0_tesla"),
        "B0Direction": record["geometry"]["b0_dir"],
        "Sources": [p for p in record["inputs"].values() if p],
        "GeneratedBy": [{"Name": "PDIQSM", "Version": record["pdiqsm_version"]}],
        "Details": {k: record[k] for k in ("result", "torch", "seconds_total")},
    }


@dataclass
class Subject:
    field: Path
    mask: Path
    params: Path | None
    relative: Path  # folder of the field relative to the search root


def find_subjects(root: Path, field_pattern: str = "*_localfield.nii*", mask_suffix: str = "mask") -> list[Subject]:
    """Every field under ``root`` matching ``field_pattern``, with its mask: the same name with the last
    ``_<suffix>`` replaced by ``_<mask_suffix>`` in the same folder; and ``params.json`` beside it
    (``<same name>_params.json`` first), when present. Fields without a mask are reported, not skipped silently."""
    subjects, missing = [], []
    for field in sorted(Path(root).rglob(field_pattern)):
        stem = nifti_stem(field)
        base = stem.rsplit("_", 1)[0] if "_" in stem else stem
        masks = [field.with_name(f"{base}_{mask_suffix}{ext}") for ext in (".nii.gz", ".nii")]
        mask = next((m for m in masks if m.exists()), None)
        if mask is None:
            missing.append(str(field))
            continue
        params = next((p for p in (field.with_name(f"{base}_params.json"), field.with_name("params.json")) if p.exists()), None)
        subjects.append(Subject(field, mask, params, field.parent.relative_to(root)))
    if missing:
        from .errors import InputError

        raise InputError(str(root), f"no mask (*_{mask_suffix}.nii[.gz]) beside: {', '.join(missing)}")
    return subjects
