"""Shared fixtures: small phantoms and NIfTI files written to a temporary folder."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def write_nifti(path, data, affine=None):
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine)
    nib.save(img, str(path))
    return path


@pytest.fixture
def small_case(tmp_path):
    """A 32x32x24 field/mask pair (sphere of 0.1 ppm) written as NIfTI; returns a dict of paths."""
    from PDIQSMLib import phantoms
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.simulation import field_of

    shape, vs = (32, 32, 24), (1.0, 1.0, 1.5)
    chi = phantoms.sphere(shape, vs, 5.0, 0.1)
    mask = phantoms.sphere(shape, vs, 14.0, 1.0) > 0
    field = field_of(chi, mask, Geometry(vs), pad=2.0)
    affine = np.diag(list(vs) + [1.0])
    return {
        "field": write_nifti(tmp_path / "field.nii.gz", field, affine),
        "mask": write_nifti(tmp_path / "mask.nii.gz", mask, affine),
        "chi": write_nifti(tmp_path / "chi.nii.gz", chi, affine),
        "affine": affine, "dir": tmp_path, "shape": shape,
    }
