"""The README's command lines, run as a new user would after its set-up commands (issue 15): the
walkthrough verbatim on its own simulated brain, the 'your data' lines verbatim on small files made
here under the names they use, and the training lines with a documented substitution (2 steps of the
tiny preset instead of 20000). Each line must exit 0 and leave the files it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import write_nifti

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def block(marker: str) -> list[list[str]]:
    """The pdiqsm lines of every ```bash block after ``<!-- marker -->``, one list per block."""
    blocks = re.findall(rf"<!-- {marker} -->\s*```bash\n(.*?)```", README, flags=re.S)
    return [[line.strip() for line in b.splitlines() if line.strip().startswith("pdiqsm ")] for b in blocks]


def run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="2")
    done = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    return done


def test_every_readme_command_block_is_covered():
    """The three kinds of block exist and every pdiqsm line of the README's command-line section is in one."""
    walkthrough, data, training = block("walkthrough"), block("your-data"), block("training")
    assert len(walkthrough) == 1 and len(data) >= 2 and len(training) == 1
    covered = {line for b in walkthrough + data + training for line in b}
    every = {line.strip() for line in README.splitlines() if line.strip().startswith("pdiqsm ")}
    assert every == covered, f"pdiqsm lines no test runs: {sorted(every - covered)}"


def test_the_walkthrough_runs_as_written(tmp_path):
    for line in block("walkthrough")[0]:
        done = run(line, tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    out = tmp_path / "out"
    for method in ("medi", "pdi", "tkd", "pdi-vi1"):
        assert (out / f"field_{method}_chi-mean.nii.gz").exists() and (out / f"field_{method}_run.json").exists()
    assert (out / "field_pdi_regions.tsv").exists() and (tmp_path / "medi_regions.tsv").exists()
    assert (tmp_path / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def your_data(folder: Path) -> None:
    """Files named as the 'your data' lines name them: a small sphere field in ppm, radians and Hz, a
    BIDS-like folder, three fields for fine-tuning, labels with names."""
    from PDIQSMLib import phantoms
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.simulation import field_of
    from PDIQSMLib.units import GAMMA_MHZ_PER_T

    shape, vs = (32, 32, 24), (1.0, 1.0, 1.5)
    aff = np.diag(list(vs) + [1.0])
    mask = phantoms.sphere(shape, vs, 14.0, 1.0) > 0
    fields = []
    for i, (radius, value) in enumerate(((5.0, 0.1), (4.0, 0.15), (6.0, 0.08))):
        chi = phantoms.sphere(shape, vs, radius, value)
        fields.append(field_of(chi, mask, Geometry(vs), pad=2.0))
    write_nifti(folder / "mask.nii.gz", mask, aff)
    write_nifti(folder / "field.nii.gz", fields[0], aff)
    write_nifti(folder / "phase.nii.gz", fields[0] * 2 * np.pi * GAMMA_MHZ_PER_T * 3 * 0.02, aff)
    write_nifti(folder / "field_hz.nii.gz", fields[0] * GAMMA_MHZ_PER_T * 3, aff)
    anat = folder / "rawdata" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    write_nifti(anat / "sub-01_localfield.nii.gz", fields[0], aff)
    write_nifti(anat / "sub-01_mask.nii.gz", mask, aff)
    for name, f in zip("abc", fields):
        write_nifti(folder / f"{name}.nii.gz", f, aff)
        write_nifti(folder / f"{name}_mask.nii.gz", mask, aff)
    labels = np.zeros(shape)
    labels[14:18, 14:18, 10:14] = 1
    labels[5:9, 14:18, 10:14] = 2
    write_nifti(folder / "labels.nii.gz", labels, aff)
    (folder / "labels.tsv").write_text("index\tname\n1\tsphere\n2\tbackground\n")


def test_the_your_data_lines_run_as_written(tmp_path):
    your_data(tmp_path)
    shared = (ROOT.parent / "shared" / "data" / "ich_simulation").exists() or os.environ.get("PDIQSM_DATA")
    for lines in block("your-data"):
        for line in lines:
            done = run(line, tmp_path)
            if "simulate ich" in line and not shared:  # the team's data is not beside this checkout
                assert done.returncode == 2 and "--data-dir" in done.stderr, done.stderr
                continue
            assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    assert (tmp_path / "out" / "phase_tikhonov_chi-mean.nii.gz").exists()
    assert (tmp_path / "out" / "field_hz_pdi_chi-std.nii.gz").exists()
    assert (tmp_path / "derivatives" / "pdiqsm" / "sub-01" / "anat" / "sub-01_desc-tkd_Chimap.nii.gz").exists()
    assert (tmp_path / "adapted.safetensors").exists() and (tmp_path / "out" / "c_pdi_chi-mean.nii.gz").exists()
    assert "sphere" in (tmp_path / "regions.tsv").read_text()


def test_the_training_lines_run_with_two_steps(tmp_path):
    lines = block("training")[0]
    assert "--steps 20000" in lines[0]
    lines[0] = lines[0].replace("--steps 20000", "--steps 2 --preset tiny --validation-count 1")
    for line in lines:
        done = run(line, tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    assert (tmp_path / "my-model.safetensors").exists() and (tmp_path / "my-model.json").exists()
