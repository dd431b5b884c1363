"""Every failure case tried (issue 14): what the user sees and what is left on disk.

Each case runs ``pdiqsm`` in a fresh process on a small simulated field in its own folder (inputs written
first, their bytes recorded), then reports the exit code, the last line on stderr, the files the run left
(anything new or changed besides the inputs, and any folder it made and left empty) and whether every input is
byte-identical afterwards.
Writes benchmarks/results/failure_cases.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib import phantoms  # noqa: E402
from PDIQSMLib.geometry import Geometry  # noqa: E402
from PDIQSMLib.simulation import field_of  # noqa: E402
from PDIQSMLib.weights import DEFAULT_WEIGHTS, manifest_path  # noqa: E402


def save(path: Path, data, affine=np.eye(4)) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def inputs(folder: Path) -> dict:
    shape, vs = (40, 40, 32), (1.0, 1.0, 1.0)
    chi = phantoms.sphere(shape, vs, 6.0, 0.1)
    mask = phantoms.sphere(shape, vs, 16.0, 1.0) > 0
    field = field_of(chi, mask, Geometry(vs), 2.0)
    files = {"field": save(folder / "field.nii.gz", field), "mask": save(folder / "mask.nii.gz", mask)}
    noisy = field + np.random.default_rng(0).normal(0, 0.01, shape) * mask  # MEDI takes many iterations on it
    files["noisy"] = save(folder / "noisy.nii.gz", noisy)
    bad = field.copy()
    bad[20, 20, 16] = np.nan
    files["nan"] = save(folder / "nan.nii.gz", bad)
    files["empty"] = save(folder / "empty.nii.gz", np.zeros(shape))
    files["small_mask"] = save(folder / "small_mask.nii.gz", mask[:30])
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    files["moved_mask"] = save(folder / "moved_mask.nii.gz", mask, shifted)
    files["four_d"] = save(folder / "four_d.nii.gz", np.stack([field, field], -1))
    (folder / "notes.txt").write_text("not an image")
    files["text"] = folder / "notes.txt"
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b broken")
    files["corrupt"] = folder / "corrupt.nii.gz"
    (folder / "model.pt").write_bytes(b"\x80\x04pickled")
    files["pickle"] = folder / "model.pt"
    data = DEFAULT_WEIGHTS.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(manifest_path(DEFAULT_WEIGHTS), folder / "truncated.json")
    (folder / "foreign.safetensors").write_bytes(data)
    manifest = json.loads(manifest_path(DEFAULT_WEIGHTS).read_text())
    manifest["architecture"]["filters"] = [4, 8, 16]
    (folder / "foreign.json").write_text(json.dumps(manifest))
    files["labels_float"] = save(folder / "labels_float.nii.gz", mask * 0.5)
    far = np.eye(4)
    far[:3, 3] = 500.0
    files["labels_far"] = save(folder / "labels_far.nii.gz", mask, far)
    (folder / "taken").write_text("a file where the output folder should be")
    files["slab"] = save(folder / "slab.nii.gz", field[:, :, 14:17])  # 3 slices: no k-space sample in the cone
    files["slab_mask"] = save(folder / "slab_mask.nii.gz", mask[:, :, 14:17])
    files["flat"] = save(folder / "flat.nii.gz", np.where(mask, 0.02, 0.0))
    tiny = np.zeros(shape)
    tiny[19:21, 19:21, 15:17] = 1
    files["tiny_mask"] = save(folder / "tiny_mask.nii.gz", tiny)
    corner = np.zeros(shape)
    corner[0, 0, 0] = 4
    files["labels_out"] = save(folder / "labels_outside.nii.gz", corner)
    holed = np.ones(shape)
    holed[20, 20, 16] = 0.0
    files["noise_zero"] = save(folder / "noise_zero.nii.gz", holed)
    (folder / "bare.safetensors").write_bytes(data)
    (folder / "bare.json").write_text("{}")
    return files


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def recon(*extra, method="tkd", field="field.nii.gz", mask="mask.nii.gz", out="out"):
    return ["reconstruct", field, "--mask", mask, "--method", method, "--out-dir", out, "--progress", "none", *extra]


CASES = [
    ("NaN in the field, inside the mask (outside it NaN is set to 0)", recon(field="nan.nii.gz"), {}),
    ("empty mask", recon(mask="empty.nii.gz"), {}),
    ("mask of another shape", recon(mask="small_mask.nii.gz"), {}),
    ("mask on another affine", recon(mask="moved_mask.nii.gz"), {}),
    ("4D field without --volume", recon(field="four_d.nii.gz"), {}),
    ("field not NIfTI", recon(field="notes.txt"), {}),
    ("corrupt NIfTI", recon(field="corrupt.nii.gz"), {}),
    ("missing field", recon(field="nope.nii.gz"), {}),
    ("Hz without B0", recon("--units", "hz"), {}),
    ("radians without TE", recon("--units", "rad", "--b0", "3"), {}),
    ("an input where the map would go (the mask named field_tkd_chi-mean, out dir = inputs' dir), with --overwrite",
     recon("--overwrite", mask="field_tkd_chi-mean.nii.gz", out="."),
     {"prepare": lambda d: shutil.copy(d / "mask.nii.gz", d / "field_tkd_chi-mean.nii.gz")}),
    ("earlier outputs, no --overwrite", recon(), {"prepare": "run twice"}),
    ("output folder is a file", recon(out="taken"), {}),
    ("weights: a pickle", recon("--weights", "model.pt", method="pdi"), {}),
    ("weights: truncated", recon("--weights", "truncated.safetensors", method="pdi"), {}),
    ("weights: another architecture", recon("--weights", "foreign.safetensors", method="pdi"), {}),
    ("labels: not integers", recon("--labels", "labels_float.nii.gz"), {}),
    ("labels: another space", recon("--labels", "labels_far.nii.gz"), {}),
    ("labels: none inside the mask (refused before the reconstruction)",
     recon("--labels", "labels_outside.nii.gz", method="pdi"), {}),
    ("weights: manifest without its entries", recon("--weights", "bare.safetensors", method="pdi"), {}),
    ("a field of 3 slices (no k-space sample in the magic-angle cone), PDI, output folder out/a/b",
     recon(field="slab.nii.gz", mask="slab_mask.nii.gz", method="pdi", out="out/a/b"), {}),
    ("a field constant in the mask, MEDI with its automatic lambda", recon(field="flat.nii.gz", method="medi"), {}),
    ("a mask of 8 voxels, PDI", recon(mask="tiny_mask.nii.gz", method="pdi"), {}),
    ("a noise std map with a zero inside the mask, MEDI", recon("--noise-std", "noise_zero.nii.gz", method="medi"), {}),
    ("disk full while writing (RLIMIT_FSIZE 40 kB)", recon(), {"preexec": limit_file_size}),
    ("too little memory for TKD (PDIQSM_MEMORY_GB=0.001)", recon(), {"env": {"PDIQSM_MEMORY_GB": "0.001"}}),
    ("Ctrl-C during MEDI", recon("--iterations", "100000", "--lambda", "1e-4", "--progress", "lines", method="medi",
                                 field="noisy.nii.gz"), {"signal": signal.SIGINT}),
    ("SIGTERM during PDI-VI", recon("--iterations", "100000", "--progress", "lines", "--device", "cpu", "--vi-where",
                                    "everywhere", method="pdi-vi2"), {"signal": signal.SIGTERM}),
    ("export: a file that is not a checkpoint", ["export", "notes.txt", "--out", "w.safetensors"], {}),
    ("export: weights not named .safetensors", ["export", "model.pt", "--out", "w.bin"], {}),
    ("simulate: 3 slices", ["simulate", "shapes", "--shape", "16", "16", "3", "--out-dir", "sim", "--progress", "none"],
     {}),
    ("folder of 3 subjects, one without a mask, one with NaN", ["reconstruct", "rawdata", "--method", "tkd", "--out-dir",
                                                                "derivatives", "--progress", "none"], {"prepare": "cohort"}),
]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes, and every empty folder (None)."""
    return {str(p.relative_to(folder)) + ("" if p.is_file() else "/"): p.read_bytes() if p.is_file() else None
            for p in folder.rglob("*") if p.is_file() or not any(p.iterdir())}


def cohort(folder: Path) -> None:
    for i in (1, 2, 3):
        anat = folder / "rawdata" / f"sub-0{i}" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(folder / ("nan.nii.gz" if i == 3 else "field.nii.gz"), anat / f"sub-0{i}_localfield.nii.gz")
        if i != 2:
            shutil.copy(folder / "mask.nii.gz", anat / f"sub-0{i}_mask.nii.gz")


def run_case(name, args, opts, template: Path) -> str:
    folder = Path(tempfile.mkdtemp(prefix="failcase-"))
    try:
        for p in template.iterdir():
            shutil.copy(p, folder / p.name)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **opts.get("env", {}))
        cmd = [sys.executable, "-m", "PDIQSMLib.cli", *args]
        prepare = opts.get("prepare")
        if prepare == "run twice":
            subprocess.run(cmd, cwd=folder, env=env, capture_output=True, timeout=600)
        elif prepare == "cohort":
            cohort(folder)
        elif callable(prepare):
            prepare(folder)
        before = snapshot(folder)
        if "signal" in opts:
            # a shell starts background jobs with SIGINT ignored, and children inherit it: give it back, as a terminal would
            child = subprocess.Popen(cmd, cwd=folder, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            for line in child.stderr:
                if line.startswith("PROGRESS 2/100000"):  # the second iteration, not yet converged
                    child.send_signal(opts["signal"])
                    break
            err = child.stderr.read()
            code = child.wait(timeout=300)
        else:
            done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600,
                                  preexec_fn=opts.get("preexec"))
            code, err = done.returncode, done.stderr
        after = snapshot(folder)
        said = [x for x in err.splitlines() if x.strip() and not x.startswith(("PROGRESS", "STATUS"))]
        new = sorted(k for k in after if k not in before or after[k] != before[k])
        inputs_intact = all(after.get(k) == v for k, v in before.items())
        staging = [k for k in after if ".pdiqsm-staging-" in k]
        message = (said[-1] if said else "").replace(str(folder) + "/", "").replace("|", "/")
        left = ", ".join(new) if new else "nothing"
        return (f"| {name} | {code} | {message[:150]} | {left[:120]} | {'yes' if inputs_intact else 'NO'} | "
                f"{'none' if not staging else len(staging)} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says what it does
    template = Path(tempfile.mkdtemp(prefix="failcase-inputs-"))
    inputs(template)
    lines = ["| case | exit | what the user sees (last line on stderr) | files the run left | inputs intact | staging folders |",
             "|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for name, args, opts in CASES:
        lines.append(run_case(name, args, opts, template))
        print(lines[-1], flush=True)
    shutil.rmtree(template, ignore_errors=True)
    write_table("failure_cases", "Every failure case tried: what the user sees, what is left on disk",
                __doc__.split("\n\n", 1)[1].strip() + "\n\n" + "\n".join(lines)
                + f"\n\nThe cohort row: the done subject's files are the run's output, by design ({time.perf_counter() - t0:.0f} s in all).")


if __name__ == "__main__":
    main()
