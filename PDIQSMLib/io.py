"""NIfTI input and output (nibabel) and QSM-CI ``params.json``.

Inputs are checked once, here, with errors that name the file and the problem. Outputs keep the
input's affine and header, are written under a temporary name and renamed, and never replace an input.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError
from .geometry import check_voxel_size, normalise_b0_dir

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3D array with the affine and header it came with."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None
    path: Path | None = None

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return check_voxel_size(self.header.get_zooms()[:3] if self.header is not None
                                else np.linalg.norm(self.affine[:3, :3], axis=0), str(self.path))


def is_nifti(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without .nii or .nii.gz."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def load_volume(path, role: str = "volume", volume_index: int | None = None, finite: bool = True) -> Volume:
    """Read a 3D NIfTI volume (or one volume of a 4D file, chosen by ``volume_index``) as float64."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), f"{role} file does not exist")
    if not is_nifti(p):
        raise InputError(str(p), f"{role} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(p))
        kind = img.get_data_dtype()
        if np.issubdtype(kind, np.complexfloating):
            raise InputError(str(p), f"{role} holds complex values ({kind}): give the real {role} image, not a complex "
                                     "one (for a complex GRE image, take its phase through a QSM pipeline first)")
        data = np.asarray(img.dataobj, dtype=np.float64)
    except InputError:
        raise
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(str(p), f"cannot read {role} as NIfTI: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if volume_index is None:
            raise InputError(str(p), f"{role} is 4D with {data.shape[3]} volumes; choose one with --volume INDEX")
        if not 0 <= volume_index < data.shape[3]:
            raise InputError(str(p), f"--volume {volume_index} is out of range for {data.shape[3]} volumes")
        data = data[..., volume_index]
    if data.ndim != 3:
        raise InputError(str(p), f"{role} must be a 3D volume, got {data.ndim}D with shape {data.shape}")
    check_voxel_size(img.header.get_zooms()[:3], f"{p} ({role} voxel size)")
    if finite and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(str(p), f"{role} contains {bad} NaN or Inf voxels")
    return Volume(data, img.affine.copy(), img.header.copy(), p)


def check_same_grid(ref: Volume, other: Volume, role: str) -> None:
    """Raise if ``other`` is not on the grid of ``ref`` (shape and affine)."""
    if other.data.shape != ref.data.shape:
        raise InputError(str(other.path), f"{role} shape {other.data.shape} differs from {ref.path}'s {ref.data.shape}")
    if not np.allclose(other.affine, ref.affine, atol=1e-4, rtol=1e-5):
        raise InputError(str(other.path), f"{role} affine differs from {ref.path}'s (mismatched geometry)")


def finite_in_mask(vol: Volume, mask: np.ndarray, role: str) -> int:
    """Refuse NaN or Inf inside ``mask``, naming ``vol``'s file; set those outside it to 0 and return how many.

    Many phase pipelines write NaN (or Inf) outside the brain of a local field or a magnitude; the mask decides
    what is read, so these are harmless and are zeroed in memory (the file is never touched). Inside the mask no
    value can be made up, so the run stops there."""
    bad = ~np.isfinite(vol.data)
    if not bad.any():
        return 0
    inside = int(np.count_nonzero(bad & np.asarray(mask, bool)))
    outside = int(np.count_nonzero(bad)) - inside
    if inside:
        more = f" (and {outside} outside it, which would be ignored)" if outside else ""
        raise InputError(str(vol.path), f"{role} contains {inside} NaN or Inf voxels inside the mask{more}")
    vol.data[bad] = 0.0
    return outside


def load_mask(path, ref: Volume) -> np.ndarray:
    """A boolean mask on ``ref``'s grid; empty masks are rejected."""
    from .plausibility import mask_warnings, warn

    vol = load_volume(path, "mask")
    check_same_grid(ref, vol, "mask")
    for note in mask_warnings(vol.data, str(path)):
        warn(note)
    mask = vol.data > 0
    if not mask.any():
        raise InputError(str(path), "mask is empty (no voxel > 0)")
    return mask


def save_volume(path, data: np.ndarray, like: Volume, description: str = "PDIQSM", protect=()) -> Path:
    """Write ``data`` (float32) with ``like``'s affine and header, atomically; refuse to replace inputs."""
    p = Path(path)
    resolved = p.resolve()
    for q in protect:
        if q is not None and Path(q).resolve() == resolved:
            raise InputError(str(p), "output would overwrite an input file")
    header = like.header.copy() if like.header is not None else nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), like.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = description[:79].encode()
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    if img.header.get_xyzt_units()[0] == "unknown":  # our affines are in mm; say so (an input's units are kept)
        img.header.set_xyzt_units("mm", img.header.get_xyzt_units()[1])
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if p.name.lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=p.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        _publish(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json_atomic(path, record: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=p.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, default=str)
    _publish(tmp, p)
    return p


def write_text_atomic(path, text: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=p.suffix, dir=p.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _publish(tmp, p)
    return p


def _publish(tmp: str, final: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it private) and rename it into place."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, final)


@dataclass
class Params:
    """Acquisition parameters from a QSM-CI ``params.json`` (any may be missing)."""

    b0_dir: tuple[float, float, float] | None = None
    voxel_size: tuple[float, float, float] | None = None
    b0: float | None = None
    te: float | None = None
    source: str = "params.json"  # the file they came from, for messages


def read_params(path) -> Params:
    """Read ``B0_dir``, ``voxel_size``, ``B0`` (T) and ``TE`` (s; the first echo if a list) from JSON."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(str(p), "params file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(str(p), f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(str(p), "expected a JSON object")
    pick = lambda *keys: next((raw[k] for k in keys if k in raw), None)  # noqa: E731
    te = pick("TE", "EchoTime")
    if isinstance(te, list):
        te = te[0] if te else None
    b0dir, vs, b0 = pick("B0_dir", "b0_dir"), pick("voxel_size", "VoxelSize"), pick("B0", "MagneticFieldStrength")
    try:
        params = Params(tuple(map(float, b0dir)) if b0dir is not None else None,
                        tuple(map(float, vs)) if vs is not None else None,
                        float(b0) if b0 is not None else None, float(te) if te is not None else None, str(p))
    except (TypeError, ValueError) as exc:
        raise InputError(str(p), f"malformed value: {exc}") from None
    if params.b0_dir is not None:
        normalise_b0_dir(params.b0_dir, f"{p} (B0_dir)")
    if params.voxel_size is not None:
        check_voxel_size(params.voxel_size, f"{p} (voxel_size)")
    for key, value, unit in (("B0", params.b0, "tesla"), ("TE", params.te, "seconds")):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InputError(str(p), f"{key} must be > 0 {unit}, got {value:g}")
    return params
