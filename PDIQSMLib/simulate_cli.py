"""``pdiqsm simulate``: write a phantom, its noisy local field, mask and params.json as NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from . import phantoms
from .errors import InputError
from .geometry import Geometry
from .io import Volume, load_mask, load_volume, save_volume, write_json_atomic
from .progress import Progress
from .simulation import add_noise, field_of

DEFAULT_TE = 0.02
DEFAULT_B0 = 3.0


def shared_data_dir() -> Path:
    """``$PDIQSM_DATA`` or the ``shared/data`` folder beside the repository."""
    env = os.environ.get("PDIQSM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_ich(data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, Volume]:
    """(chi, mask, noise_std, chi volume) of the shared hemorrhage case."""
    d = Path(data_dir) if data_dir else shared_data_dir() / "ich_simulation"
    if not d.exists():
        raise InputError(str(d), "ICH data folder not found: the hemorrhage case is the team's shared data, not part of "
                                 "the repository (it sits in shared/data/ich_simulation beside a checkout); pass "
                                 "--data-dir FOLDER (with chi_ppm, mask and noise_std .nii.gz) or set PDIQSM_DATA; "
                                 "'pdiqsm simulate brain' needs no data")
    chi = load_volume(d / "chi_ppm.nii.gz", "truth chi")
    mask = load_mask(d / "mask.nii.gz", chi)
    noise = load_volume(d / "noise_std.nii.gz", "noise std")
    return chi.data.astype(np.float32), mask, noise.data, chi


def ich_field(chi: np.ndarray, mask: np.ndarray, noise_std: np.ndarray, level: float, seed: int,
              geometry: Geometry = Geometry((1.0, 1.0, 3.0))) -> np.ndarray:
    """Field of the ICH case: forward model (2x padding) plus noise level * noise_std / median in the mask."""
    sigma = level * noise_std / np.median(noise_std[mask])
    return add_noise(field_of(chi, mask, geometry, pad=2.0), mask, sigma, np.random.default_rng(seed))


def make_phantom(kind: str, shape, voxel_size, seed: int) -> phantoms.Phantom:
    rng = np.random.default_rng(seed)
    if kind == "brain":
        return phantoms.brain(shape, voxel_size, rng)
    if kind == "shapes":
        return phantoms.random_shapes(shape, voxel_size, rng)
    fov = min(n * h for n, h in zip(shape, voxel_size))
    if kind == "sphere":
        chi = phantoms.sphere(shape, voxel_size, 0.15 * fov, 0.2)
    else:
        chi = phantoms.cylinder(shape, voxel_size, 0.08 * fov, 0.2, axis=(1.0, 0.0, 1.0))
    mask = phantoms.sphere(shape, voxel_size, 0.45 * fov, 1.0) > 0
    return phantoms.Phantom(np.where(mask, chi, 0.0).astype(np.float32), mask, Geometry(voxel_size))


def simulate(args, progress: Progress) -> list[Path]:
    out = Path(args.out_dir)
    if args.kind == "ich":
        chi, mask, noise, like = load_ich(args.data_dir)
        geometry = Geometry(like.voxel_size, args.b0_dir)
        field = ich_field(chi, mask, noise, args.noise, args.seed, geometry)
        written = [save_volume(out / "noise_std.nii.gz", noise, like)]
    else:
        geometry = Geometry(tuple(args.voxel_size), tuple(args.b0_dir))
        ph = make_phantom(args.kind, tuple(args.shape), geometry.voxel_size, args.seed)
        chi, mask = ph.chi, ph.mask
        field = add_noise(field_of(chi, mask, geometry, pad=2.0), mask, args.noise, np.random.default_rng(args.seed + 1))
        like = Volume(chi, np.diag(list(geometry.voxel_size) + [1.0]), nib.Nifti1Header())
        written = []
    progress.status(f"simulated {args.kind}: shape {chi.shape}, B0 {geometry.b0_dir}, noise {args.noise} ppm")
    written += [save_volume(out / "chi.nii.gz", chi, like, "truth chi ppm"),
                save_volume(out / "mask.nii.gz", mask.astype(np.float32), like, "mask"),
                save_volume(out / "field.nii.gz", field, like, "local field ppm"),
                write_json_atomic(out / "params.json", {"B0_dir": list(geometry.b0_dir),
                                                        "voxel_size": list(geometry.voxel_size),
                                                        "B0": DEFAULT_B0, "TE": [DEFAULT_TE],
                                                        "noise_ppm": args.noise, "seed": args.seed})]
    return written
