"""The command line and NIfTI I/O: round trips, every bad input, no partial outputs."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_nifti
from PDIQSMLib.cli import main
from PDIQSMLib.errors import InputError
from PDIQSMLib.io import load_volume, read_params, save_volume
from PDIQSMLib.progress import Progress, parse_line


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def recon_args(case, out_dir, *extra):
    return ["reconstruct", str(case["field"]), "--mask", str(case["mask"]), "--method", "tkd",
            "--out-dir", str(out_dir), "--progress", "none", *extra]


def test_reconstruct_writes_map_with_input_geometry_and_record(small_case, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run(recon_args(small_case, out), capsys)
    assert code == 0
    img = nib.load(str(out / "field_tkd_chi-mean.nii.gz"))
    assert img.shape == small_case["shape"]
    assert np.allclose(img.affine, small_case["affine"])
    assert np.allclose(img.header.get_zooms(), (1.0, 1.0, 1.5))
    record = json.loads((out / "field_tkd_run.json").read_text())
    assert record["settings"]["method"] == "tkd" and record["geometry"]["voxel_size"] == [1.0, 1.0, 1.5]
    assert "torch" in record and record["result"]["seconds"] >= 0
    assert not list(out.glob(".tmp-*"))


def test_units_conversion_through_the_command(small_case, capsys, tmp_path):
    from PDIQSMLib.units import GAMMA_MHZ_PER_T

    field = nib.load(str(small_case["field"]))
    hz = write_nifti(tmp_path / "field_hz.nii.gz", field.get_fdata() * GAMMA_MHZ_PER_T * 3.0, field.affine)
    run(recon_args(small_case, tmp_path / "a"), capsys)
    args = recon_args(small_case, tmp_path / "b", "--units", "hz", "--b0", "3")
    args[1] = str(hz)
    assert run(args, capsys)[0] == 0
    a = nib.load(str(tmp_path / "a" / "field_tkd_chi-mean.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "b" / "field_hz_tkd_chi-mean.nii.gz")).get_fdata()
    assert np.allclose(a, b, atol=1e-6)


def test_progress_lines_are_parseable(small_case, capsys, tmp_path):
    args = recon_args(small_case, tmp_path / "o", "--iterations", "5")
    args[args.index("tkd")] = "medi"
    args[args.index("none")] = "lines"
    code, _, err = run(args, capsys)
    assert code == 0
    steps = [parse_line(line) for line in err.splitlines() if line.startswith("PROGRESS")]
    assert steps and steps[0] == (1, 5, "medi") and steps[-1][0] == steps[-1][1]


def zero_axis_nifti(path, data, affine):
    """An uncompressed NIfTI whose sform has a zero second column (patched after nibabel wrote it)."""
    write_nifti(path, data, affine)
    raw = bytearray(path.read_bytes())
    raw[252:254] = np.int16(0).tobytes()  # qform_code: unused
    raw[296:312] = np.zeros(4, "<f4").tobytes()  # srow_y
    raw[280 + 4:280 + 8] = np.float32(0).tobytes()  # srow_x[1]
    raw[312 + 4:312 + 8] = np.float32(0).tobytes()  # srow_z[1]
    path.write_bytes(bytes(raw))
    return path


def bad_case(small_case, tmp_path, kind):
    """Arguments for one kind of bad input, and the phrase its error must contain."""
    field = nib.load(str(small_case["field"]))
    data, aff = field.get_fdata(), field.affine
    args = recon_args(small_case, tmp_path / "out")
    if kind == "nan":
        data = data.copy()
        data[16, 16, 12] = np.nan  # the sphere's centre: inside the mask
        data[0, 0, 0] = np.inf  # outside it: ignored, but counted in the message
        args[1] = str(write_nifti(tmp_path / "nan.nii.gz", data, aff))
        return args, "field contains 1 NaN or Inf voxels inside the mask (and 1 outside it"
    if kind == "empty mask":
        args[3] = str(write_nifti(tmp_path / "empty.nii.gz", np.zeros_like(data), aff))
        return args, "empty"
    if kind == "mask shape":
        args[3] = str(write_nifti(tmp_path / "m.nii.gz", np.ones((32, 32, 20)), aff))
        return args, "shape"
    if kind == "mask affine":
        shifted = aff.copy()
        shifted[0, 3] = 5.0
        args[3] = str(write_nifti(tmp_path / "m.nii.gz", np.ones_like(data), shifted))
        return args, "affine"
    if kind == "complex":
        img = nib.Nifti1Image(data.astype(np.complex64), aff)
        nib.save(img, str(tmp_path / "complex.nii.gz"))
        args[1] = str(tmp_path / "complex.nii.gz")
        return args, "complex.nii.gz: field holds complex values (complex64)"
    if kind == "2d":
        args[1] = str(write_nifti(tmp_path / "flat.nii.gz", data[:, :, 0], aff))
        return args, "3D"
    if kind == "4d":
        args[1] = str(write_nifti(tmp_path / "four.nii.gz", np.stack([data, data], -1), aff))
        return args, "--volume"
    if kind == "not nifti":
        (tmp_path / "field.mat").write_bytes(b"MATLAB 5.0")
        args[1] = str(tmp_path / "field.mat")
        return args, "not a NIfTI"
    if kind == "corrupt":
        (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
        args[1] = str(tmp_path / "bad.nii.gz")
        return args, "cannot read"
    if kind == "zero voxel":
        # nibabel neither writes nor reads a zero pixdim, but a file's sform can still collapse an axis
        args[1] = str(zero_axis_nifti(tmp_path / "z.nii", data, aff))
        args[3] = str(zero_axis_nifti(tmp_path / "zm.nii", np.ones_like(data), aff))
        return args, "positive"
    if kind == "units":
        return args + ["--units", "tesla"], "unknown units"
    if kind == "hz without b0":
        return args + ["--units", "hz"], "B0"
    if kind == "rad without te":
        return args + ["--units", "rad", "--b0", "3"], "TE"
    if kind == "zero b0 dir":
        return args + ["--b0-dir", "0", "0", "0"], "zero"
    if kind == "noise std zero":
        noise = np.ones_like(data)
        noise[16, 16, 12] = 0.0  # the sphere's centre: a weight of 1 / 0
        args[args.index("tkd")] = "medi"
        return args + ["--noise-std", str(write_nifti(tmp_path / "n.nii.gz", noise, aff))], \
            "n.nii.gz: noise standard deviation must be > 0 inside the mask"
    if kind == "tkd threshold":
        return args + ["--threshold", "0.7"], "--threshold: TKD's truncation of |D| must lie in (0, 2/3), got 0.7"
    if kind == "tikhonov lambda 0":
        args[args.index("tkd")] = "tikhonov"
        return args + ["--lambda", "0"], "--lambda: Tikhonov needs a weight > 0"
    if kind == "missing":
        args[1] = str(tmp_path / "nope.nii.gz")
        return args, "does not exist"
    if kind == "overwrite input":
        # the mask sits where the mean map would be written (output folder = the inputs' folder)
        victim = write_nifti(tmp_path / "field_tkd_chi-mean.nii.gz", np.ones_like(data), aff)
        args[1] = str(write_nifti(tmp_path / "field.nii.gz", data, aff))
        args[3] = str(victim)
        args[args.index("--out-dir") + 1] = str(tmp_path)
        return args, "overwrite"
    raise AssertionError(kind)


BAD = ["nan", "empty mask", "mask shape", "mask affine", "2d", "4d", "not nifti", "corrupt", "zero voxel",
       "units", "hz without b0", "rad without te", "zero b0 dir", "missing", "tkd threshold", "tikhonov lambda 0",
       "noise std zero", "complex"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_gives_one_clear_line_and_no_output(small_case, capsys, tmp_path, kind):
    args, phrase = bad_case(small_case, tmp_path, kind)
    code, _, err = run(args, capsys)
    assert code == 2
    assert phrase in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_output_that_would_overwrite_input_is_refused(small_case, capsys, tmp_path):
    args, phrase = bad_case(small_case, tmp_path, "overwrite input")
    before = (tmp_path / "field_tkd_chi-mean.nii.gz").read_bytes()
    code, _, err = run(args, capsys)
    assert code == 2 and phrase in err
    assert (tmp_path / "field_tkd_chi-mean.nii.gz").read_bytes() == before


def test_error_names_the_file(small_case, capsys, tmp_path):
    args, _ = bad_case(small_case, tmp_path, "nan")
    _, _, err = run(args, capsys)
    assert "nan.nii.gz" in err


def test_nan_and_inf_outside_the_mask_are_ignored_and_recorded(small_case, capsys, tmp_path):
    """Phase pipelines often write NaN outside the brain (field, magnitude): the mask decides what is read, so
    the run gives the map of the same field with zeros there, leaves the input file as it was, and says in its
    record how many voxels were set to 0."""
    field = nib.load(str(small_case["field"]))
    mask = nib.load(str(small_case["mask"])).get_fdata() > 0
    data = field.get_fdata()
    holed = np.where(mask, data, np.nan)
    holed[0, 0, :3] = [np.inf, -np.inf, np.nan]
    nan_field = write_nifti(tmp_path / "nanfield.nii.gz", holed, field.affine)
    magnitude = write_nifti(tmp_path / "mag.nii.gz", np.where(mask, 1.0 + data * 50, np.nan), field.affine)
    before = nan_field.read_bytes()
    outside = int((~mask).sum())
    runs = {}
    for name, path in (("zeros", small_case["field"]), ("nan", nan_field)):
        args = recon_args(small_case, tmp_path / name, "--magnitude", str(magnitude), "--iterations", "20")
        args[args.index("tkd")] = "medi"  # reads the magnitude's edges too
        args[1] = str(path)
        assert run(args, capsys)[0] == 0
        stem = Path(path).name.split(".")[0]
        runs[name] = (nib.load(str(tmp_path / name / f"{stem}_medi_chi-mean.nii.gz")).get_fdata(),
                      json.loads((tmp_path / name / f"{stem}_medi_run.json").read_text()))
    assert np.all(np.isfinite(runs["nan"][0]))
    assert np.array_equal(runs["nan"][0], runs["zeros"][0])  # the small case's field is already 0 outside the mask
    assert runs["nan"][1]["nonfinite_outside_mask"] == {"field": outside, "magnitude": outside}
    assert runs["zeros"][1]["nonfinite_outside_mask"] == {"magnitude": outside}
    assert nan_field.read_bytes() == before


def test_debug_shows_traceback(small_case, capsys, tmp_path):
    args, _ = bad_case(small_case, tmp_path, "empty mask")
    _, _, err = run(args + ["--debug"], capsys)
    assert "Traceback" in err


def test_4d_volume_selection(small_case, capsys, tmp_path):
    field = nib.load(str(small_case["field"]))
    four = write_nifti(tmp_path / "four.nii.gz", np.stack([field.get_fdata(), 2 * field.get_fdata()], -1), field.affine)
    vol = load_volume(four, "field", volume_index=1)
    assert np.allclose(vol.data, 2 * field.get_fdata())
    with pytest.raises(InputError, match="out of range"):
        load_volume(four, "field", volume_index=2)


def test_save_keeps_header_and_never_replaces_input(tmp_path):
    aff = np.array([[0, -1.2, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    src = write_nifti(tmp_path / "in.nii.gz", np.random.default_rng(0).random((6, 7, 5)), aff)
    vol = load_volume(src, "field")
    out = save_volume(tmp_path / "o.nii.gz", vol.data * 2, vol)
    img = nib.load(str(out))
    assert np.allclose(img.affine, aff) and img.get_data_dtype() == np.float32
    assert np.allclose(img.get_fdata(), vol.data * 2, atol=1e-6)
    with pytest.raises(InputError, match="overwrite"):
        save_volume(src, vol.data, vol, protect=[src])


def test_params_json(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"B0_dir": [0, 0.1, 1], "voxel_size": [1, 1, 2], "B0": 7, "TE": [0.004, 0.008]}))
    params = read_params(p)
    assert params.b0 == 7.0 and params.te == 0.004 and params.voxel_size == (1.0, 1.0, 2.0)
    p.write_text("{broken")
    with pytest.raises(InputError, match="JSON"):
        read_params(p)
    for bad, phrase in (({"B0_dir": [0, 0, 0]}, r"params.json \(B0_dir\): the vector is zero"),
                        ({"B0": -3}, "params.json: B0 must be > 0 tesla, got -3"),
                        ({"TE": [20, 40], "B0": 3}, None), ({"TE": 0}, "params.json: TE must be > 0 seconds"),
                        ({"voxel_size": [1, 0, 1]}, r"params.json \(voxel_size\): voxel sizes must be positive")):
        p.write_text(json.dumps(bad))
        if phrase is None:  # implausible (TE in ms) but readable: the field's own check warns after conversion
            assert read_params(p).te == 20.0
            continue
        with pytest.raises(InputError, match=phrase):
            read_params(p)


def test_params_b0_dir_reaches_the_reconstruction(small_case, capsys, tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"B0_dir": [0, 0.6, 0.8], "voxel_size": [1, 1, 1.5]}))
    run(recon_args(small_case, tmp_path / "o", "--params", str(p)), capsys)
    record = json.loads((tmp_path / "o" / "field_tkd_run.json").read_text())
    assert np.allclose(record["geometry"]["b0_dir"], [0, 0.6, 0.8])
    p.write_text(json.dumps({"voxel_size": [2, 2, 2]}))
    code, _, err = run(recon_args(small_case, tmp_path / "o2", "--params", str(p)), capsys)
    assert code == 2 and "voxel_size" in err


def test_simulate_then_evaluate(capsys, tmp_path):
    """evaluate scores against the truth (a doubled map is 100 % off; Gaussian errors of a known sigma
    fall within 1 and 2 sigma 68 % and 95 % of the time, and the figure's curve follows the diagonal);
    simulate's field and truth agree (TKD from the field lands near the truth)."""
    from PDIQSMLib.evaluation import coverage_curve

    sim = tmp_path / "sim"
    assert run(["simulate", "sphere", "--shape", "32", "32", "32", "--out-dir", str(sim), "--progress", "none"], capsys)[0] == 0
    assert json.loads((sim / "params.json").read_text())["B0_dir"] == [0.0, 0.0, 1.0]
    truth_img = nib.load(str(sim / "chi.nii.gz"))
    truth = truth_img.get_fdata()
    mask = nib.load(str(sim / "mask.nii.gz")).get_fdata() > 0
    doubled = write_nifti(tmp_path / "doubled.nii.gz", 2 * truth, truth_img.affine)
    code, out, _ = run(["evaluate", str(doubled), "--truth", str(sim / "chi.nii.gz"), "--mask",
                        str(sim / "mask.nii.gz"), "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0 and "doubled.nii.gz" in out
    assert json.loads((tmp_path / "m.json").read_text())["rmse"] == pytest.approx(100.0, abs=1e-3)
    rng = np.random.default_rng(3)
    sigma = np.full(truth.shape, 0.02)
    noisy = write_nifti(tmp_path / "noisy.nii.gz", truth + rng.normal(0, 0.02, truth.shape), truth_img.affine)
    std = write_nifti(tmp_path / "std.nii.gz", sigma, truth_img.affine)
    code, out, _ = run(["evaluate", str(noisy), "--truth", str(sim / "chi.nii.gz"), "--mask", str(sim / "mask.nii.gz"),
                        "--std", str(std), "--json", str(tmp_path / "n.json"), "--figure", str(tmp_path / "cal.png")], capsys)
    table = json.loads((tmp_path / "n.json").read_text())
    assert code == 0 and table["within_1sigma"] == pytest.approx(0.683, abs=0.02)
    assert table["within_2sigma"] == pytest.approx(0.954, abs=0.01)
    assert (tmp_path / "cal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nominal, observed = coverage_curve(nib.load(str(noisy)).get_fdata(), sigma, truth, mask)
    assert np.max(np.abs(observed - nominal)) < 0.03
    _, observed_half = coverage_curve(nib.load(str(noisy)).get_fdata(), sigma / 2, truth, mask)
    assert np.all(observed_half[3:] < nominal[3:] - 0.05)  # sigma too small: below the diagonal
    assert run(["evaluate", str(noisy), "--truth", str(sim / "chi.nii.gz"), "--mask", str(sim / "mask.nii.gz"),
                "--figure", str(tmp_path / "x.png")], capsys)[0] == 2
    assert run(["reconstruct", str(sim / "field.nii.gz"), "--mask", str(sim / "mask.nii.gz"), "--method", "tkd",
                "--out-dir", str(tmp_path / "r"), "--progress", "none"], capsys)[0] == 0
    run(["evaluate", str(tmp_path / "r" / "field_tkd_chi-mean.nii.gz"), "--truth", str(sim / "chi.nii.gz"), "--mask",
         str(sim / "mask.nii.gz"), "--json", str(tmp_path / "t.json")], capsys)
    assert json.loads((tmp_path / "t.json").read_text())["rmse_demeaned"] < 60.0


def test_progress_bar_and_lines(capsys):
    import io

    buf = io.StringIO()
    Progress("lines", buf).task("medi")(3, 10)
    assert parse_line(buf.getvalue()) == (3, 10, "medi")
    buf = io.StringIO()
    Progress("bar", buf).task("medi")(10, 10)
    assert "10/10" in buf.getvalue() and buf.getvalue().endswith("\n")


@pytest.mark.parametrize("kind", ["hz", "rad", "mask as field", "field as mask", "fraction", "te in ms",
                                  "phase as magnitude"])
def test_implausible_inputs_are_named_in_one_warning_line(small_case, capsys, tmp_path, kind):
    """A field in Hz or radians read as ppm, a field in units of B0, a phase whose TE was given in ms, a mask given
    as the field and a field given as the mask run, but each says on one line what it looks like and what to pass."""
    from PDIQSMLib.units import GAMMA_MHZ_PER_T

    img = nib.load(str(small_case["field"]))
    field = img.get_fdata()
    args = recon_args(small_case, tmp_path / "o")
    if kind == "hz":  # a 0.1 ppm sphere at 3 T: fields of ~5-25 Hz
        args[1] = str(write_nifti(tmp_path / "hz.nii.gz", field * GAMMA_MHZ_PER_T * 3 * 20, img.affine))
        phrase = "likely Hz: pass --units hz"
    elif kind == "rad":  # the same field as a wrapped phase at a long TE
        phase = np.angle(np.exp(1j * field * 2 * np.pi * GAMMA_MHZ_PER_T * 3 * 0.5))
        args[1] = str(write_nifti(tmp_path / "rad.nii.gz", phase, img.affine))
        phrase = "likely radians"
    elif kind == "fraction":  # chi's field as a fraction of B0, 1e-6 ppm
        args[1] = str(write_nifti(tmp_path / "fraction.nii.gz", field * 1e-6, img.affine))
        phrase = "implausibly small for a local field (typically 0.02-0.2 ppm); a field in units of B0"
    elif kind == "te in ms":  # phase at TE 20 ms, read with --te 20: the field 1000 times too small
        phase = field * 2 * np.pi * GAMMA_MHZ_PER_T * 3 * 0.02
        args[1] = str(write_nifti(tmp_path / "phase.nii.gz", phase, img.affine))
        args += ["--units", "rad", "--b0", "3", "--te", "20"]
        phrase = "after conversion from rad, implausibly small"
    elif kind == "phase as magnitude":
        args += ["--magnitude", str(write_nifti(tmp_path / "mag.nii.gz", field - 0.05, img.affine))]
        phrase = "mag.nii.gz: the magnitude holds negative values inside the mask: is it a phase or a field?"
    elif kind == "mask as field":
        args[1] = str(small_case["mask"])
        phrase = "is this a mask rather than a field"
    else:
        args[3] = str(small_case["field"])
        phrase = "is it a field rather than a mask"
    code, _, err = run(args, capsys)
    warned = [x for x in err.splitlines() if x.startswith("pdiqsm: warning:")]
    assert code == 0 and len(warned) == 1 and phrase in warned[0], err
    named = {"field as mask": args[3], "phase as magnitude": args[-1]}.get(kind, args[1])
    assert Path(named).name in warned[0]  # names the file


def test_a_plausible_field_gives_no_warning(small_case, capsys, tmp_path):
    code, _, err = run(recon_args(small_case, tmp_path / "o"), capsys)
    assert code == 0 and "warning" not in err


def test_medi_says_when_it_stops_before_converging(small_case, capsys, tmp_path):
    """Three iterations cannot reach a relative change of 1e-3 (ADMM starts from zero): a warning and the
    record say so; the default limit converges on this sphere and stays silent."""
    args = recon_args(small_case, tmp_path / "o", "--iterations", "3")
    args[args.index("tkd")] = "medi"
    code, _, err = run(args, capsys)
    record = json.loads((tmp_path / "o" / "field_medi_run.json").read_text())
    assert code == 0 and "MEDI stopped at its iteration limit (3)" in err and "--iterations" in err
    assert record["result"]["medi"]["converged"] is False and record["result"]["medi"]["iterations"] == 3
    args = recon_args(small_case, tmp_path / "p")
    args[args.index("tkd")] = "medi"
    code, _, err = run(args, capsys)
    record = json.loads((tmp_path / "p" / "field_medi_run.json").read_text())
    assert code == 0 and "warning" not in err and record["result"]["medi"]["converged"] is True
    assert record["result"]["medi"]["iterations"] < 200


def test_a_training_share_outside_zero_to_one_is_refused_before_anything_is_written(capsys, tmp_path):
    code, _, err = run(["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "c.pt"),
                        "--sharp-fraction", "1.5"], capsys)
    assert code == 2 and "--sharp-fraction: a share between 0 and 1, not 1.5" in err
    assert not any(tmp_path.iterdir())
    base = ["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "c.pt")]
    code, _, err = run(base + ["--bleed-fraction", "-0.1"], capsys)
    assert code == 2 and "--bleed-fraction: a share between 0 and 1, not -0.1" in err
    code, _, err = run(base + ["--bleed-fraction", "0.5", "--simulator", "clean"], capsys)
    assert code == 2 and "--bleed-fraction: bleeds are put into the realistic simulator's anatomical brains" in err
    code, _, err = run(base + ["--distant-ppm", "5e-3", "1e-3"], capsys)
    assert code == 2 and "--distant-ppm: 0 0, or bounds 0 < LO <= HI in ppm, not 0.005 0.001" in err
    code, _, err = run(base + ["--distant-ppm", "1e-3", "5e-3", "--simulator", "clean"], capsys)
    assert code == 2 and "--distant-ppm: the distant field is one of the realistic simulator's terms" in err
    code, _, err = run(base + ["--column-fraction", "2"], capsys)
    assert code == 2 and "--column-fraction: a share between 0 and 1, not 2" in err
    code, _, err = run(base + ["--texture-fraction", "1.01"], capsys)
    assert code == 2 and "--texture-fraction: a share between 0 and 1, not 1.01" in err
    assert not any(tmp_path.iterdir())


def unreadable_case(small_case, tmp_path, kind):
    """(field, mask) files whose noise level cannot be read, and the file the error must name."""
    field = nib.load(str(small_case["field"]))
    data, aff = field.get_fdata(), field.affine
    mask = nib.load(str(small_case["mask"])).get_fdata()
    if kind == "three slices":  # 1.5 mm: kz = 0.22 / mm needs |k| > 0.34 for the cone, beyond the sphere's 1 / 3
        f = write_nifti(tmp_path / "slab.nii.gz", data[:, :, 10:13], aff)
        return f, write_nifti(tmp_path / "slab_mask.nii.gz", mask[:, :, 10:13], aff), f
    if kind == "constant":
        f = write_nifti(tmp_path / "flat.nii.gz", np.where(mask > 0, 0.02, 0.0), aff)
        return f, small_case["mask"], f
    m = np.zeros_like(mask)
    m[15:17, 15:17, 11:13] = 1  # 8 voxels
    mpath = write_nifti(tmp_path / "small_mask.nii.gz", m, aff)
    return small_case["field"], mpath, mpath


@pytest.mark.parametrize("kind", ["three slices", "constant", "tiny mask"])
def test_a_field_whose_noise_level_cannot_be_read_is_refused_naming_the_input(small_case, capsys, tmp_path, kind):
    """PDI (its Tikhonov channel), PDI-VI and MEDI/Tikhonov's automatic lambda read the field's noise level off the
    magic-angle cone: where there is none to read, one line naming the file at fault, before any work; a fixed
    lambda does without it, and TKD never needs it."""
    field, mask, culprit = unreadable_case(small_case, tmp_path, kind)
    base = ["reconstruct", str(field), "--mask", str(mask), "--progress", "none"]
    for method in ("pdi", "medi"):
        out = tmp_path / method
        code, _, err = run(base + ["--method", method, "--out-dir", str(out)], capsys)
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"pdiqsm reconstruct: error: {culprit}: ")
        assert ("a fixed --lambda does without it" in err) == (method == "medi")
        assert not out.exists()
    for extra in (["--method", "medi", "--lambda", "1e-3"], ["--method", "tkd"]):
        code, _, _ = run(base + extra + ["--out-dir", str(tmp_path / extra[1])], capsys)
        assert code == 0
    code, _, err = run(["fieldstats", str(field), "--mask", str(mask)], capsys)  # a constant field reads 0
    assert code == (0 if kind == "constant" else 2)
    assert code == 0 or err.strip().splitlines()[-1].startswith(f"pdiqsm fieldstats: error: {culprit}: ")


@pytest.mark.parametrize("extra,phrase", [
    (["sphere", "--shape", "0", "10", "10"], "--shape: at least 8 voxels along each axis, got 0 10 10"),
    (["shapes", "--shape", "16", "16", "3"], "--shape: at least 8 voxels along each axis"),  # was 'high - low < 0'
    (["sphere", "--noise", "-1"], "--noise: a noise standard deviation in ppm, >= 0, got -1"),  # was |noise|
    (["sphere", "--voxel-size", "0", "1", "1"], "--voxel-size: voxel sizes must be positive and finite, got 0 1 1"),
    (["realistic", "--shape", "12", "12", "12"], "holds 0 voxels: give a larger field of view"),  # was an empty mask
])
def test_simulate_refuses_what_would_give_no_usable_phantom(capsys, tmp_path, extra, phrase):
    code, _, err = run(["simulate", *extra, "--out-dir", str(tmp_path / "s"), "--progress", "none"], capsys)
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
