"""Acquisition geometry: voxel size and the main-field direction in the volume's own voxel axes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

# Scanner B0 lies along world z (NIfTI world axes are the scanner's RAS+ axes).
SCANNER_B0 = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel size (mm, per voxel axis) and unit B0 direction expressed in voxel axes."""

    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    b0_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxel_size", check_voxel_size(self.voxel_size))
        object.__setattr__(self, "b0_dir", normalise_b0_dir(self.b0_dir))


def network_axes(geometry: Geometry) -> tuple[int, int, int]:
    """The voxel axes in the order PDI's network reads them: the axis nearest B0 last, the other two in their order.
    The network was trained with B0 within 20 degrees of its third axis (``simulation.SimulationConfig.max_tilt_deg``);
    relabelling the axes is exact (the dipole kernel follows them), so a volume whose B0 lies along another axis
    (a sagittal or coronal acquisition's voxel order) is read as one from its training. Ties keep the third axis."""
    b = np.abs(np.asarray(geometry.b0_dir))
    k = 2 if b[2] >= b.max() - 1e-9 else int(np.argmax(b))
    return tuple(i for i in range(3) if i != k) + (k,)


def permuted(geometry: Geometry, order) -> Geometry:
    """``geometry`` of the volume whose voxel axes are this one's taken in ``order`` (``np.transpose(x, order)``)."""
    return Geometry(tuple(geometry.voxel_size[i] for i in order), tuple(geometry.b0_dir[i] for i in order))


def check_voxel_size(voxel_size, source: str = "voxel size") -> tuple[float, float, float]:
    """Return the voxel size as three positive finite floats, or raise InputError."""
    vs = np.asarray(voxel_size, dtype=float).ravel()
    if vs.size != 3:
        raise InputError(source, f"expected 3 voxel sizes, got {vs.size}")
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise InputError(source, f"voxel sizes must be positive and finite, got {' '.join(f'{v:g}' for v in vs)}")
    return tuple(float(v) for v in vs)


def normalise_b0_dir(b0_dir, source: str = "B0 direction") -> tuple[float, float, float]:
    """Return B0 as a unit 3-vector, or raise InputError for a zero or malformed vector."""
    b = np.asarray(b0_dir, dtype=float).ravel()
    if b.size != 3 or not np.all(np.isfinite(b)):
        raise InputError(source, f"expected 3 finite components, got {b0_dir!r}")
    norm = np.linalg.norm(b)
    if norm < 1e-9:
        raise InputError(source, "the vector is zero; give the main-field direction, e.g. 0 0 1")
    return tuple(float(v) for v in b / norm)


def voxel_size_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size as the lengths of the affine's first three columns."""
    return check_voxel_size(np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0), "affine")


def b0_dir_from_affine(affine: np.ndarray, world_b0=SCANNER_B0) -> tuple[float, float, float]:
    """Express the world-space B0 direction (default scanner z) in the voxel axes of ``affine``.

    The columns of the affine's 3x3 part, divided by the voxel size, are the world directions of the
    voxel axes; for an orthonormal (possibly left-handed) frame R, world vector w has voxel-axis
    components R^T w. Sheared frames have no such reading and are rejected.
    """
    a = np.asarray(affine, dtype=float)[:3, :3]
    rot = a / np.asarray(voxel_size_from_affine(affine))
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-3):
        raise InputError("affine", "voxel axes are not orthogonal (sheared grid); give --b0-dir explicitly")
    return normalise_b0_dir(rot.T @ np.asarray(world_b0, float))


def geometry_from_affine(affine: np.ndarray, b0_dir=None) -> Geometry:
    """Geometry of a NIfTI volume; ``b0_dir`` (voxel axes) overrides the direction read from the affine."""
    vs = voxel_size_from_affine(affine)
    return Geometry(vs, b0_dir if b0_dir is not None else b0_dir_from_affine(affine))


def affine_for_b0(voxel_size, b0_dir, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A NIfTI affine whose voxel axes are rotated so that scanner z (B0) has the components ``b0_dir``
    in them (``b0_dir_from_affine`` of the result gives ``b0_dir`` back): the rotation R with R b = z
    (the smallest one, about b x z), columns scaled by the voxel size."""
    b = np.asarray(normalise_b0_dir(b0_dir), float)
    z = np.array([0.0, 0.0, 1.0])
    axis, cos = np.cross(b, z), float(b @ z)
    sin = float(np.linalg.norm(axis))
    if sin < 1e-12:
        rot = np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])  # B0 along +z, or along -z (half turn about x)
    else:
        k = axis / sin
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rot = np.eye(3) + sin * kx + (1.0 - cos) * kx @ kx
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(check_voxel_size(voxel_size), float)[None, :]
    affine[:3, 3] = origin
    return affine
