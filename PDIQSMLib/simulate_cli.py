"""``pdiqsm simulate``: write a phantom, its noisy local field, mask and params.json as NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from . import phantoms
from .errors import InputError
from .fieldstats import MIN_VOXELS
from .geometry import Geometry, check_voxel_size, normalise_b0_dir
from .io import Volume, load_mask, load_volume
from .outputs import OutputSet
from .progress import Progress
from .simulation import add_noise, field_of

DEFAULT_TE = 0.02
DEFAULT_B0 = 3.0
MIN_SIDE = 8  # voxels along each axis: a thinner grid holds no k-space sample of the magic-angle cone, or hardly any


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


def realistic_brain(voxel_size, b0_dir, seed: int, max_shape, sharp: bool = False, texture: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chi, mask, field, nucleus labels) of an MNI152 brain with a realistic local field (the training
    simulator's non-dipolar terms: anisotropy, background residue, correlated noise, mask error); ``sharp``: one
    brain's tissue boundaries (anatomy.sharp_tissue); ``texture``: fine tissue texture (anatomy.tissue_texture)."""
    from . import anatomy
    from .simulation import realistic_brain as simulated

    if not anatomy.available():
        raise InputError("simulate realistic", "needs the MNI152 templates of nilearn's wheel: pip install nilearn")
    sample, labels = simulated(seed, voxel_size, b0_dir, max_shape, sharp, texture)
    return sample.chi, sample.mask, sample.field, labels.astype(np.float32)


def simulate(args, progress: Progress) -> list[Path]:
    """Write chi (truth), mask, field and params.json (and noise_std for ich; labels for realistic). An
    oblique ``--b0-dir`` goes into the affine too (voxel axes rotated so that scanner z has those
    components), so the files reconstruct correctly with or without params.json."""
    from .geometry import affine_for_b0

    out = Path(args.out_dir)
    b0_dir = normalise_b0_dir(args.b0_dir)
    check_voxel_size(args.voxel_size, "--voxel-size")
    if args.kind != "ich" and min(args.shape) < MIN_SIDE:
        raise InputError("--shape", f"at least {MIN_SIDE} voxels along each axis, got {' '.join(map(str, args.shape))}")
    if not (np.isfinite(args.noise) and args.noise >= 0):
        raise InputError("--noise", f"a noise standard deviation in ppm, >= 0, got {args.noise:g}")
    labels = noise = None
    if args.kind == "ich":
        chi, mask, noise, like = load_ich(args.data_dir)
        geometry = Geometry(like.voxel_size, b0_dir)
        field = ich_field(chi, mask, noise, args.noise, args.seed, geometry)
        affine = affine_for_b0(like.voxel_size, b0_dir, like.affine[:3, 3]) if b0_dir != (0.0, 0.0, 1.0) else like.affine
        like = Volume(chi, affine, like.header)
    elif args.kind == "realistic":
        chi, mask, field, labels = realistic_brain(tuple(args.voxel_size), b0_dir, args.seed, tuple(args.shape),
                                                   args.sharp, args.texture)
        geometry = Geometry(tuple(args.voxel_size), b0_dir)
        like = Volume(chi, affine_for_b0(geometry.voxel_size, b0_dir), nib.Nifti1Header())
    else:
        geometry = Geometry(tuple(args.voxel_size), b0_dir)
        ph = make_phantom(args.kind, tuple(args.shape), geometry.voxel_size, args.seed)
        chi, mask = ph.chi, ph.mask
        field = add_noise(field_of(chi, mask, geometry, pad=2.0), mask, args.noise, np.random.default_rng(args.seed + 1))
        like = Volume(chi, affine_for_b0(geometry.voxel_size, b0_dir), nib.Nifti1Header())
    if int(np.count_nonzero(mask)) < MIN_VOXELS:  # what reconstruct would refuse (no field statistics)
        raise InputError("--shape", f"the {args.kind} phantom's mask on {' x '.join(map(str, chi.shape))} voxels of "
                                    f"{' x '.join(f'{v:g}' for v in geometry.voxel_size)} mm holds "
                                    f"{int(np.count_nonzero(mask))} voxels: give a larger field of view")
    progress.status(f"simulated {args.kind}: shape {chi.shape}, B0 {geometry.b0_dir}, noise {args.noise} ppm")
    names = {"noise_std": "noise_std.nii.gz", "chi": "chi.nii.gz", "mask": "mask.nii.gz", "field": "field.nii.gz",
             "labels": "labels.nii.gz", "names": "labels.tsv", "record": "params.json"}
    outputs = OutputSet({k: out / v for k, v in names.items()}, overwrite=True)  # a set: no stale labels or noise map
    with outputs:
        if noise is not None:
            outputs.volume("noise_std", noise, like, "noise std")
        outputs.volume("chi", chi, like, "truth chi ppm")
        outputs.volume("mask", mask.astype(np.float32), like, "mask")
        outputs.volume("field", field, like, "local field ppm")
        if labels is not None:
            from .anatomy import nucleus_names
            from .regions import names_tsv

            outputs.volume("labels", labels, like, "nucleus labels")
            outputs.text("names", names_tsv(nucleus_names()))
        outputs.json("record", {"B0_dir": list(geometry.b0_dir), "voxel_size": list(geometry.voxel_size),
                                "B0": DEFAULT_B0, "TE": [DEFAULT_TE],
                                "noise_ppm": args.noise if args.kind != "realistic" else None, "seed": args.seed,
                                **({"sharp": args.sharp, "texture": args.texture} if args.kind == "realistic" else {})})
        return outputs.publish()
