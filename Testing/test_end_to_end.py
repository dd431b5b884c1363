"""End to end through the ``pdiqsm`` command, checked against the simulated truth: oblique and
left-handed geometry, the three field units, the noise map and the magnitude (issue 17)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from PDIQSMLib.cli import main
from PDIQSMLib.metrics import nrmse_demeaned
from PDIQSMLib.units import GAMMA_MHZ_PER_T

SHAPE = ("56", "56", "40")
TILT = math.radians(32.0)
OBLIQUE = (f"{math.sin(TILT) * math.cos(0.6):.6f}", f"{math.sin(TILT) * math.sin(0.6):.6f}", f"{math.cos(TILT):.6f}")


def simulate(folder, b0_dir=("0", "0", "1"), seed="3"):
    assert main(["simulate", "brain", "--shape", *SHAPE, "--voxel-size", "1", "1", "1.5", "--b0-dir", *b0_dir,
                 "--noise", "1e-3", "--seed", seed, "--out-dir", str(folder), "--progress", "none"]) == 0
    return folder


def reconstruct(field, mask, out, method, *extra) -> np.ndarray:
    assert main(["reconstruct", str(field), "--mask", str(mask), "--method", method, "--out-dir", str(out),
                 "--progress", "none", "--device", "cpu", "--overwrite", *extra]) == 0
    stem = str(field).rsplit("/", 1)[-1].split(".nii")[0]
    return nib.load(str(out / f"{stem}_{method}_chi-mean.nii.gz")).get_fdata()


def error(chi, sim) -> float:
    truth = nib.load(str(sim / "chi.nii.gz")).get_fdata()
    return nrmse_demeaned(chi, truth, nib.load(str(sim / "mask.nii.gz")).get_fdata() > 0)


def flip_x(path, out):
    """The same volume in a left-handed frame: voxel order reversed along the first axis, the affine's first
    column negated and its origin moved to the old last voxel (every voxel keeps its world position)."""
    img = nib.load(str(path))
    a = img.affine.copy()
    a[:3, 3] = a[:3, 3] + a[:3, 0] * (img.shape[0] - 1)
    a[:3, 0] = -a[:3, 0]
    assert np.linalg.det(a[:3, :3]) < 0
    return write_nifti(out, img.get_fdata()[::-1], a)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    aligned, oblique = simulate(root / "aligned"), simulate(root / "oblique", OBLIQUE)
    left = root / "left"
    left.mkdir()
    for name in ("field", "mask", "chi"):
        flip_x(oblique / f"{name}.nii.gz", left / f"{name}.nii.gz")
    return {"root": root, "aligned": aligned, "oblique": oblique, "left": left}


@pytest.mark.parametrize("method", ["tkd", "medi", "pdi"])
def test_a_32_degree_b0_in_rotated_and_left_handed_frames_reconstructs_as_well_as_aligned(cases, method):
    """simulate writes the oblique B0 into the affine: reconstructing without params.json reads it from
    there, and in a left-handed copy of the files too. Their errors stay within a few points of the
    axis-aligned case; ignoring the tilt (B0 forced along z) costs far more, so the bound can fail."""
    root, extra = cases["root"], ("--iterations", "60") if method == "medi" else ()
    params = json.loads((cases["oblique"] / "params.json").read_text())
    assert np.allclose(params["B0_dir"], np.array(OBLIQUE, float) / np.linalg.norm(np.array(OBLIQUE, float)), atol=1e-6)
    e_aligned = error(reconstruct(cases["aligned"] / "field.nii.gz", cases["aligned"] / "mask.nii.gz",
                                  root / "o-aligned", method, *extra), cases["aligned"])
    e_oblique = error(reconstruct(cases["oblique"] / "field.nii.gz", cases["oblique"] / "mask.nii.gz",
                                  root / "o-oblique", method, *extra), cases["oblique"])
    left = reconstruct(cases["left"] / "field.nii.gz", cases["left"] / "mask.nii.gz", root / "o-left", method, *extra)
    e_left = error(left, cases["left"])
    e_ignored = error(reconstruct(cases["oblique"] / "field.nii.gz", cases["oblique"] / "mask.nii.gz",
                                  root / "o-ignored", method, "--b0-dir", "0", "0", "1", *extra), cases["oblique"])
    print(f"{method}: aligned {e_aligned:.1f}, oblique {e_oblique:.1f}, left-handed {e_left:.1f}, tilt ignored {e_ignored:.1f}")
    assert e_oblique < e_aligned + 8.0 and e_left < e_oblique + 3.0
    assert e_ignored > e_oblique + 15.0


def test_the_three_units_give_the_same_map(cases, tmp_path):
    """The field in ppm, in Hz at 3 T, and as a phase in radians at TE from params.json reconstruct alike."""
    sim = cases["oblique"]
    img = nib.load(str(sim / "field.nii.gz"))
    params = json.loads((sim / "params.json").read_text())
    b0, te = params["B0"], params["TE"][0]
    ppm = reconstruct(sim / "field.nii.gz", sim / "mask.nii.gz", tmp_path / "ppm", "tkd")
    hz = write_nifti(tmp_path / "hz.nii.gz", img.get_fdata() * GAMMA_MHZ_PER_T * b0, img.affine)
    rad = write_nifti(tmp_path / "rad.nii.gz", img.get_fdata() * 2 * np.pi * GAMMA_MHZ_PER_T * b0 * te, img.affine)
    from_hz = reconstruct(hz, sim / "mask.nii.gz", tmp_path / "hz", "tkd", "--units", "hz", "--b0", str(b0))
    from_rad = reconstruct(rad, sim / "mask.nii.gz", tmp_path / "rad", "tkd", "--units", "rad", "--params",
                           str(sim / "params.json"))
    scale = np.abs(ppm).max()
    assert np.abs(from_hz - ppm).max() < 1e-4 * scale and np.abs(from_rad - ppm).max() < 1e-4 * scale
    wrong_te = reconstruct(rad, sim / "mask.nii.gz", tmp_path / "rad2", "tkd", "--units", "rad", "--b0", str(b0),
                           "--te", str(2 * te))
    assert np.allclose(wrong_te, ppm / 2, atol=1e-4 * scale)  # TE enters as physics says: twice the TE, half the chi


@pytest.mark.parametrize("method", ["medi", "pdi"])
def test_the_noise_map_makes_a_corrupted_region_count_less(cases, tmp_path, method):
    """A slab of the field is corrupted (0.05 ppm noise, as in a region of low signal); given a noise
    std map that says so, MEDI's W and PDI's weighted prior lean on the rest: the error against the truth
    outside the slab drops."""
    sim = cases["aligned"]
    img = nib.load(str(sim / "field.nii.gz"))
    mask = nib.load(str(sim / "mask.nii.gz")).get_fdata() > 0
    field = img.get_fdata()
    slab = np.zeros(field.shape, bool)
    slab[:, 20:30, :] = True
    rng = np.random.default_rng(0)
    corrupted = np.where(slab & mask, field + rng.normal(0, 0.05, field.shape), field)
    bad = write_nifti(tmp_path / "bad.nii.gz", corrupted, img.affine)
    noise = write_nifti(tmp_path / "noise.nii.gz", np.where(slab, 0.05, 1e-3), img.affine)
    truth = nib.load(str(sim / "chi.nii.gz")).get_fdata()
    rest = mask & ~slab
    extra = ("--iterations", "60") if method == "medi" else ()
    plain = reconstruct(bad, sim / "mask.nii.gz", tmp_path / "plain", method, *extra)
    weighted = reconstruct(bad, sim / "mask.nii.gz", tmp_path / "weighted", method, "--noise-std", str(noise), *extra)
    e_plain, e_weighted = nrmse_demeaned(plain, truth, rest), nrmse_demeaned(weighted, truth, rest)
    print(f"{method}: outside the corrupted slab {e_plain:.1f} % without the noise map, {e_weighted:.1f} % with it")
    assert e_weighted < e_plain - 3.0


def test_the_magnitude_keeps_an_edge_sharper_in_medi(cases, tmp_path):
    """With a magnitude whose edges are the truth's, MEDI's TV spares them: the error on the edge voxels
    of the truth drops against the same MEDI without a magnitude (strong lambda, so TV matters)."""
    from scipy import ndimage

    sim = cases["aligned"]
    truth_img = nib.load(str(sim / "chi.nii.gz"))
    truth = truth_img.get_fdata()
    mask = nib.load(str(sim / "mask.nii.gz")).get_fdata() > 0
    magnitude = write_nifti(tmp_path / "mag.nii.gz", 1.0 - 3.0 * truth, truth_img.affine)  # contrast follows chi
    plain = reconstruct(sim / "field.nii.gz", sim / "mask.nii.gz", tmp_path / "plain", "medi", "--lambda", "2e-2",
                        "--iterations", "60")
    edged = reconstruct(sim / "field.nii.gz", sim / "mask.nii.gz", tmp_path / "edged", "medi", "--lambda", "2e-2",
                        "--iterations", "60", "--magnitude", str(magnitude))
    gradient = np.sqrt(sum(ndimage.sobel(truth, axis=a) ** 2 for a in range(3)))
    edges = mask & (gradient > np.percentile(gradient[mask], 90))
    e_plain, e_edged = nrmse_demeaned(plain, truth, edges), nrmse_demeaned(edged, truth, edges)
    print(f"MEDI on the truth's edges: {e_plain:.1f} % without magnitude, {e_edged:.1f} % with it")
    assert e_edged < e_plain - 3.0


def test_medi_can_take_its_edges_from_pdis_map(cases, tmp_path, capsys):
    """--medi-edges pdi: MEDI's edge mask is the magnitude rule applied to PDI's map of the same field (its
    0.7 N strongest gradient components spared, N the mask's voxels) and lambda follows its own rule (c s^2,
    c = 400): the map equals MEDI run by hand with that mask and lambda; the run record says where the edges
    came from; with a magnitude as well, the command refuses (two sources for one mask)."""
    import torch

    from PDIQSMLib import solvers
    from PDIQSMLib.fieldstats import cone_noise
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.weighting import gradient_mask, without_mean

    sim = cases["aligned"]
    field, mask_path = sim / "field.nii.gz", sim / "mask.nii.gz"
    guided = reconstruct(field, mask_path, tmp_path / "guided", "medi", "--medi-edges", "pdi", "--iterations", "40")
    record = json.loads((tmp_path / "guided" / "field_medi_run.json").read_text())
    assert record["settings"]["medi_edges"] == "pdi" and record["result"]["edges"]["from"] == "pdi"
    pdi = reconstruct(field, mask_path, tmp_path / "pdi", "pdi")
    params = json.loads((sim / "params.json").read_text())
    geometry = Geometry(tuple(params["voxel_size"]), tuple(params["B0_dir"]))
    m = nib.load(str(mask_path)).get_fdata() > 0
    b = without_mean(nib.load(str(field)).get_fdata(), m)[0]  # as every method reads it (--field-mean remove)
    lam = 400.0 * cone_noise(b, m, geometry) ** 2
    assert record["result"]["lambda"] == pytest.approx(lam, rel=1e-4)
    edges = gradient_mask(m, pdi, geometry.voxel_size, solvers.PDI_EDGE_FRACTION)
    assert 0.1 < 1.0 - edges[:, m].mean() < 0.3  # 0.7 N of the 3 N components at most, some outside the mask
    by_hand = solvers.medi(torch.from_numpy(b), torch.from_numpy(m.astype(np.float32)), geometry, lam,
                           edge_mask=torch.from_numpy(edges), max_iter=40).numpy()
    assert np.abs(guided - by_hand).max() < 1e-3 * np.abs(by_hand).max()
    magnitude = write_nifti(tmp_path / "mag.nii.gz", np.ones(m.shape), nib.load(str(field)).affine)
    assert main(["reconstruct", str(field), "--mask", str(mask_path), "--method", "medi", "--medi-edges", "pdi",
                 "--magnitude", str(magnitude), "--out-dir", str(tmp_path / "both"), "--progress", "none"]) == 2
    assert "--medi-edges" in capsys.readouterr().err and not (tmp_path / "both").exists()  # no output written
