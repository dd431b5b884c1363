"""Region statistics: the interval of a region's mean under correlated errors, names, labels, the table."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from PDIQSMLib.errors import InputError
from PDIQSMLib.io import load_volume
from PDIQSMLib.regions import NAIVE, ErrorModel, contrast_std, correlated_samples, load_labels, read_names, region_stats

VS = (1.0, 1.0, 2.0)


def test_the_interval_spans_independent_to_fully_correlated_errors():
    """For a region's mean (weights 1/n): independent voxels give sqrt(sum sigma^2)/n; a correlation
    length far beyond the region gives mean(sigma) (all voxels wrong together); kappa scales both."""
    rng = np.random.default_rng(0)
    std = rng.uniform(0.01, 0.03, (20, 20, 10))
    region = np.zeros(std.shape, bool)
    region[5:9, 6:10, 3:5] = True
    w = region / region.sum()
    assert contrast_std(w, std, NAIVE, VS) == pytest.approx(np.sqrt(np.sum(std[region] ** 2)) / region.sum())
    assert contrast_std(w, std, ErrorModel(1.0, 1e4), VS) == pytest.approx(std[region].mean(), rel=1e-6)
    assert contrast_std(w, std, ErrorModel(2.0, 1e4), VS) == pytest.approx(2 * std[region].mean(), rel=1e-6)
    middle = contrast_std(w, std, ErrorModel(1.0, 3.0), VS)
    assert contrast_std(w, std, NAIVE, VS) < middle < std[region].mean()


def test_the_closed_form_matches_correlated_samples():
    """The quadratic form equals the spread of the contrast over error fields drawn with that correlation."""
    rng = np.random.default_rng(1)
    std = rng.uniform(0.01, 0.03, (40, 40, 20))
    a = np.zeros(std.shape, bool)
    a[10:16, 10:18, 5:9] = True
    w = a / a.sum() - 1.0 / std.size  # a region against the whole volume
    model = ErrorModel(1.0, 4.0)
    draws = [np.sum(w * e) for e in correlated_samples(std, model, VS, 600, rng)]
    assert np.std(draws) == pytest.approx(contrast_std(w, std, model, VS), rel=0.1)


def test_region_table_against_known_values():
    """Means relative to each reference, volume, spread, labels outside the mask, and a reference's own
    uncertainty widening the interval."""
    chi = np.zeros((20, 20, 10))
    labels = np.zeros(chi.shape, int)
    mask = np.zeros(chi.shape, bool)
    mask[2:18, 2:18, 1:9] = True
    labels[4:8, 4:8, 2:4] = 1
    chi[labels == 1] = 0.2
    labels[10:14, 10:14, 2:4] = 2
    chi[labels == 2] = 0.05
    labels[0:2, 0:2, 0:2] = 3  # outside the mask
    chi += 0.01 * mask
    std = np.full(chi.shape, 0.02)
    names = {1: "caudate", 2: "putamen", 3: "sky"}
    whole = region_stats(chi, mask, labels, VS, std, names)
    rows = {r["name"]: r for r in whole["rows"]}
    brain_mean = chi[mask].mean()
    assert set(rows) == {"caudate", "putamen"} and "3" in whole["notes"][0]
    assert rows["caudate"]["mean_ppm"] == pytest.approx(0.21 - brain_mean)
    assert rows["caudate"]["voxels"] == 32 and rows["caudate"]["volume_ml"] == pytest.approx(32 * 2 / 1000)
    by_label = region_stats(chi, mask, labels, VS, std, names, reference="putamen")
    rows2 = {r["name"]: r for r in by_label["rows"]}
    assert rows2["caudate"]["mean_ppm"] == pytest.approx(0.15) and rows2["putamen"]["mean_ppm"] == pytest.approx(0.0)
    # a 32-voxel reference adds its own variance: sqrt(2) times the independent width of one region
    assert rows2["caudate"]["std_of_mean_independent_ppm"] == pytest.approx(np.sqrt(2) * 0.02 / np.sqrt(32))
    none = region_stats(chi, mask, labels, VS, None, names, reference="none")
    assert none["rows"][0]["mean_ppm"] == pytest.approx(0.21) and "std_of_mean_ppm" not in none["rows"][0]
    with pytest.raises(InputError, match="neither"):
        region_stats(chi, mask, labels, VS, std, names, reference="amygdala")


def test_names_in_three_formats(tmp_path):
    (tmp_path / "n.tsv").write_text("index\tname\n1\tcaudate\n2\tputamen\n")
    (tmp_path / "n.json").write_text(json.dumps({"1": "caudate", "2": "putamen"}))
    (tmp_path / "LUT.txt").write_text("# FreeSurfer\n1  caudate 70 130 180 0\n2 putamen 10 10 10 0\n")
    for f in ("n.tsv", "n.json", "LUT.txt"):
        assert read_names(tmp_path / f) == {1: "caudate", 2: "putamen"}
    (tmp_path / "bad.tsv").write_text("nothing here\n")
    with pytest.raises(InputError, match="bad.tsv"):
        read_names(tmp_path / "bad.tsv")


def test_labels_on_another_sampling_are_resampled_and_foreign_grids_refused(tmp_path):
    """Labels at 0.5 mm over the field's 1 mm grid are taken by nearest neighbour (with a note); a
    probability map, a 4D file and a grid elsewhere are refused with the file named."""
    field = load_volume(write_nifti(tmp_path / "f.nii.gz", np.zeros((10, 10, 6)), np.eye(4)))
    fine = np.zeros((20, 20, 12))
    fine[4:10, 4:10, 2:6] = 7  # field voxels 2..4 x 2..4 x 1..2 (centres at 2 x fine index)
    fine_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    labels, note = load_labels(write_nifti(tmp_path / "fine.nii.gz", fine, fine_affine), field)
    assert "nearest neighbour" in note and labels.shape == (10, 10, 6)
    assert set(map(tuple, np.argwhere(labels == 7))) == {(i, j, k) for i in (2, 3, 4) for j in (2, 3, 4) for k in (1, 2)}
    same, note = load_labels(write_nifti(tmp_path / "same.nii.gz", labels, np.eye(4)), field)
    assert note is None and np.array_equal(same, labels)
    with pytest.raises(InputError, match="whole numbers"):
        load_labels(write_nifti(tmp_path / "prob.nii.gz", labels * 0.3, np.eye(4)), field)
    far = np.eye(4)
    far[:3, 3] = 500
    with pytest.raises(InputError, match="not the same space"):
        load_labels(write_nifti(tmp_path / "far.nii.gz", labels, far), field)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 6, 2), np.float32), np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(InputError, match="four.nii.gz"):
        load_labels(tmp_path / "four.nii.gz", field)


def test_stats_and_reconstruct_write_the_same_table(small_case, tmp_path, capsys):
    """reconstruct --labels writes the region table with the maps (one set); stats on those maps gives the
    same rows; the table refuses to replace itself without --overwrite; bad labels stop before the work."""
    from PDIQSMLib.cli import main
    from PDIQSMLib.regions import read_table_tsv

    img = nib.load(str(small_case["chi"]))
    labels = np.zeros(img.shape)
    labels[14:18, 14:18, 10:14] = 1  # the sphere's core
    labels[4:8, 14:18, 10:14] = 2  # outside the sphere, inside the mask
    lab = write_nifti(tmp_path / "lab.nii.gz", labels, img.affine)
    (tmp_path / "lab.tsv").write_text("index\tname\n1\tsphere\n2\tbackground\n")
    out = tmp_path / "o"
    assert main(["reconstruct", str(small_case["field"]), "--mask", str(small_case["mask"]), "--method", "pdi",
                 "--device", "cpu", "--labels", str(lab), "--out-dir", str(out), "--progress", "none"]) == 0
    rows = {r["name"]: r for r in read_table_tsv(out / "field_pdi_regions.tsv")}
    assert rows["sphere"]["mean_ppm"] > rows["background"]["mean_ppm"] + 0.03  # the 0.1 ppm sphere stands out
    assert rows["sphere"]["ci95_low_ppm"] < rows["sphere"]["mean_ppm"] < rows["sphere"]["ci95_high_ppm"]
    record = json.loads((out / "field_pdi_run.json").read_text())
    assert record["regions"]["reference"] == "mean over the whole mask"
    table = tmp_path / "t.tsv"
    args = ["stats", str(out / "field_pdi_chi-mean.nii.gz"), "--std", str(out / "field_pdi_chi-std.nii.gz"), "--labels",
            str(lab), "--mask", str(small_case["mask"]), "--out", str(table), "--progress", "none"]
    assert main(args) == 0
    again = {r["name"]: r for r in read_table_tsv(table)}
    for name in rows:
        for key in ("voxels", "mean_ppm", "std_of_mean_ppm", "ci95_low_ppm"):
            assert again[name][key] == pytest.approx(rows[name][key], rel=1e-4)
    capsys.readouterr()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args[:-2] + ["--reference", "background", "--overwrite", "--progress", "none"]) == 0
    assert {r["name"]: r for r in read_table_tsv(table)}["background"]["mean_ppm"] == pytest.approx(0.0, abs=1e-9)
    bad = write_nifti(tmp_path / "bad.nii.gz", labels * 0.5, img.affine)
    assert main(["reconstruct", str(small_case["field"]), "--mask", str(small_case["mask"]), "--method", "tkd",
                 "--labels", str(bad), "--out-dir", str(tmp_path / "b"), "--progress", "none"]) == 2
    assert "whole numbers" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_labels_with_no_voxel_in_the_mask_are_refused_naming_the_file_before_the_work(small_case, tmp_path, capsys,
                                                                                        monkeypatch):
    import PDIQSMLib.pipeline as pipeline
    from PDIQSMLib.cli import main

    img = nib.load(str(small_case["chi"]))
    labels = np.zeros(img.shape)
    labels[0, 0, 0] = 3  # a corner: outside the sphere's mask
    lab = write_nifti(tmp_path / "corner.nii.gz", labels, img.affine)
    ran = []
    monkeypatch.setattr(pipeline, "reconstruct", lambda *a, **k: ran.append(1))
    assert main(["reconstruct", str(small_case["field"]), "--mask", str(small_case["mask"]), "--method", "pdi",
                 "--labels", str(lab), "--out-dir", str(tmp_path / "o"), "--progress", "none"]) == 2
    assert f"{lab}: no label (> 0) has a voxel inside the mask" in capsys.readouterr().err and not ran
    assert main(["stats", str(small_case["chi"]), "--labels", str(lab), "--mask", str(small_case["mask"]), "--out",
                 str(tmp_path / "t.tsv"), "--progress", "none"]) == 2
    assert f"{lab}: no label (> 0) has a voxel inside the mask" in capsys.readouterr().err
    assert not (tmp_path / "t.tsv").exists()


def test_folder_mode_writes_a_table_per_subject_and_one_across_them(small_case, tmp_path, capsys):
    import shutil

    from PDIQSMLib.cli import main

    img = nib.load(str(small_case["chi"]))
    labels = np.zeros(img.shape)
    labels[14:18, 14:18, 10:14] = 1
    for i in (1, 2):
        anat = tmp_path / "raw" / f"sub-0{i}" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(small_case["field"], anat / f"sub-0{i}_localfield.nii.gz")
        shutil.copy(small_case["mask"], anat / f"sub-0{i}_mask.nii.gz")
        write_nifti(anat / f"sub-0{i}_labels.nii.gz", labels * i, img.affine)  # sub-02 calls the same region 2
    out = tmp_path / "out"
    assert main(["reconstruct", str(tmp_path / "raw"), "--method", "tkd", "--labels-suffix", "labels", "--out-dir",
                 str(out), "--progress", "none"]) == 0
    assert (out / "sub-01" / "anat" / "sub-01_desc-tkdRegions_stats.tsv").exists()
    group = (out / "group_desc-tkdRegions_stats.tsv").read_text().splitlines()
    assert group[0] == "label\tname\tsub-01\tsub-02"
    first, second = group[1].split("\t"), group[2].split("\t")
    assert first[0] == "1" and first[3] == "" and second[0] == "2" and second[2] == ""
    assert float(first[2]) == pytest.approx(float(second[3]))  # the same field and region in both subjects


def test_the_shared_reference_form_equals_the_direct_one():
    from PDIQSMLib.regions import ContrastVariance

    rng = np.random.default_rng(2)
    std = rng.uniform(0.01, 0.03, (30, 30, 16))
    mask = np.zeros(std.shape, bool)
    mask[3:27, 3:27, 2:14] = True
    region = np.zeros(std.shape, bool)
    region[10:14, 12:15, 5:8] = True
    for model in (NAIVE, ErrorModel(1.3, 4.0)):
        ref = mask / mask.sum()
        direct = contrast_std(region / region.sum() - ref, std, model, VS)
        assert ContrastVariance(std, model, VS, ref)(region / region.sum()) == pytest.approx(direct, rel=1e-6)
        assert ContrastVariance(std, model, VS, np.zeros(std.shape))(region / region.sum()) == pytest.approx(
            contrast_std(region / region.sum(), std, model, VS), rel=1e-6)


def test_the_bundled_weights_carry_their_region_calibration():
    """The calibration beside the bundled weights names their checksum (a re-export without recalibrating
    fails here), is used by default for their std maps, and is not used for other weights."""
    from PDIQSMLib.regions import calibration_path, error_model_for, load_error_model
    from PDIQSMLib.weights import DEFAULT_WEIGHTS, sha256

    record = json.loads(calibration_path(DEFAULT_WEIGHTS).read_text())
    digest = sha256(DEFAULT_WEIGHTS)
    assert record["weights_sha256"] == digest and 0.9 <= record["coverage_test"] <= 0.98
    model = error_model_for(True, None, digest)
    assert model.length_mm == record["length_mm"] and model.kappa == record["kappa"] and not model.naive
    assert load_error_model(DEFAULT_WEIGHTS, "0" * 64) is None
    assert error_model_for(True, None, "0" * 64).naive and "too narrow" in error_model_for(True, None, "0" * 64).source
    assert error_model_for(False, None, digest) is None


def test_the_calibrated_interval_covers_unseen_brains_where_the_naive_one_does_not():
    """One realistic brain never seen in training or calibration (benchmark test seed 41006), the bundled
    PDI and its stored calibration: the 95 % intervals of the 14 nucleus contrasts (left and right) hold
    the truth for most regions; independent voxels hold almost none. The full table (140 regions, 92 %
    against 4 %): benchmarks/results/region_calibration.md."""
    from PDIQSMLib import anatomy

    if not anatomy.available():
        pytest.skip("needs nilearn's MNI152 templates")
    from benchmarks.region_calibration import brain, zscores
    from PDIQSMLib.pipeline import Settings, reconstruct
    from PDIQSMLib.regions import Z95, error_model_for
    from PDIQSMLib.weights import DEFAULT_WEIGHTS, sha256

    sample, labels = brain(41006)
    res = reconstruct(sample.field, sample.mask, sample.geometry, Settings(method="pdi", device="cpu"))
    case = [(sample, labels, res, None)]
    calibrated = np.abs(zscores(case, error_model_for(True, None, sha256(DEFAULT_WEIGHTS)))) <= Z95
    naive = np.abs(zscores(case, NAIVE)) <= Z95
    print(f"covered: calibrated {calibrated.sum()}/{calibrated.size}, independent voxels {naive.sum()}/{naive.size}")
    assert calibrated.size == 14 and calibrated.sum() >= 11 and naive.sum() <= 3
