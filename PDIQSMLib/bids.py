"""BIDS-style derivative names and sidecars, and finding subjects' inputs in a folder tree.

A susceptibility map is named by the input's entities with the suffix ``Chimap`` (the BIDS suffix
for susceptibility maps) and a ``desc-<method>`` entity (``desc-pdi``, ``desc-pdivi1``, ``desc-medi``...,
so that maps of different methods never replace or pair with each other); the standard deviation map
carries ``desc-<method>Std``. The JSON sidecar holds the units, the method, its settings and the
software version.
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


def desc_label(method: str) -> str:
    """A method as a BIDS label (alphanumeric): ``pdi-vi1`` -> ``pdivi1``."""
    return re.sub(r"[^a-zA-Z0-9]", "", method)


def bids_names(field_path, method: str) -> dict[str, str]:
    prefix, desc = entities_prefix(field_path), desc_label(method)
    return {"mean": f"{prefix}_desc-{desc}_Chimap.nii.gz", "std": f"{prefix}_desc-{desc}Std_Chimap.nii.gz",
            "regions": f"{prefix}_desc-{desc}Regions_stats.tsv", "record": f"{prefix}_desc-{desc}_Chimap.json"}


DESCRIPTIONS = {"tkd": "magnetic susceptibility (truncated k-space division, closed form)",
                "tikhonov": "magnetic susceptibility (Tikhonov-regularised inversion, closed form)",
                "medi": "magnetic susceptibility (MEDI, maximum a posteriori estimate)",
                "pdi": "magnetic susceptibility (PDI posterior mean)",
                "pdi-vi1": "magnetic susceptibility (PDI-VI posterior mean, fine-tuned with the TV prior)",
                "pdi-vi2": "magnetic susceptibility (PDI-VI posterior mean, fine-tuned with a flat prior)"}


def sidecar(record: dict) -> dict:
    """A BIDS-style JSON sidecar from a run record."""
    settings = record["settings"]
    return {
        "Units": "ppm",
        "Description": DESCRIPTIONS.get(settings["method"], "magnetic susceptibility")
        + (f"; its standard deviation in desc-{desc_label(settings['method'])}Std"
           if any(p.endswith("Std_Chimap.nii.gz") for p in record["outputs"]) else ""),
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


def find_subjects(root: Path, field_pattern: str = "*_localfield.nii*",
                  mask_suffix: str = "mask") -> tuple[list[Subject], list[Path]]:
    """Every field under ``root`` matching ``field_pattern``, with its mask: the same name with the last
    ``_<suffix>`` replaced by ``_<mask_suffix>`` in the same folder; and ``params.json`` beside it
    (``<same name>_params.json`` first), when present. Returns the subjects and the fields without a mask
    (reported by the caller as failed, never skipped silently)."""
    subjects, missing = [], []
    for field in sorted(Path(root).rglob(field_pattern)):
        stem = nifti_stem(field)
        base = stem.rsplit("_", 1)[0] if "_" in stem else stem
        masks = [field.with_name(f"{base}_{mask_suffix}{ext}") for ext in (".nii.gz", ".nii")]
        mask = next((m for m in masks if m.exists()), None)
        if mask is None:
            missing.append(field)
            continue
        params = next((p for p in (field.with_name(f"{base}_params.json"), field.with_name("params.json")) if p.exists()), None)
        subjects.append(Subject(field, mask, params, field.parent.relative_to(root)))
    return subjects, missing
