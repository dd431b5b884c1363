"""The ``pdiqsm`` command: reconstruct, simulate, evaluate, stats, fieldstats, train, finetune, export, demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from . import __version__, defaults
from .errors import Cancelled, InputError, Terminated
from .pipeline import METHODS, Settings
from .progress import Progress
from .units import UNITS

_python_showwarning = warnings.showwarning


def _add_field_units(p: argparse.ArgumentParser) -> None:
    """How to read a field file: its units (with B0 and TE where needed), B0 direction, QSM-CI params."""
    p.add_argument("--units", default="ppm", help=f"field units: {', '.join(UNITS)} (default ppm)")
    p.add_argument("--b0", type=float, help="field strength in tesla (needed for hz and rad)")
    p.add_argument("--te", type=float, help="echo time in seconds (needed for rad)")
    p.add_argument("--b0-dir", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes (default: scanner z through the NIfTI affine)")
    p.add_argument("--params", type=Path, help="QSM-CI params.json (B0_dir, voxel_size, B0, TE)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="progress on stderr: a bar on a terminal, else one 'PROGRESS i/n label' line per step")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


NOISY_REGIONS_HELP = ("without a noise std map, for MEDI and PDI(-VI): auto (default) finds where the field itself is "
                      "noise (an acute bleed's signal void: local roughness over 10 times the brain's and like noise, "
                      "not a steep dipole field) and down-weights it as a noise map would (run.json counts the voxels; "
                      "on 16 healthy simulated brains it marked 2 voxels in one, none in the rest); off trusts every "
                      "mask voxel")
FIELD_MEAN_HELP = ("remove (default): the field's mean in the mask (weighted by the noise map's inverse variance) is "
                   "taken off before any method (a constant is harmonic: it cannot be told from background, e.g. an "
                   "unwrapping's 2 pi n; run.json gives it; benchmarks/results/field_offset.md); keep: as given")
# pdiqsm train: shares of anatomical brains
SHARE_FLAGS = ("--sharp-fraction", "--bleed-fraction", "--column-fraction", "--texture-fraction")
FIELD_TREND_HELP = ("remove: a linear trend across the brain (harmonic: distant sources, background removal) fitted "
                    "beside PDI's map of the field and taken off first, for any method (three extra PDI passes a field; "
                    "run.json or the adapted weights' manifest gives it; benchmarks/results/field_trend.md); keep "
                    "(default): as given")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdiqsm", description=(
        "Quantitative susceptibility mapping from a local field map: Probabilistic Dipole Inversion "
        "(mean and standard deviation, ppm) and MAP baselines (MEDI, Tikhonov, TKD)."))
    parser.add_argument("--version", action="version", version=f"pdiqsm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("reconstruct", help="susceptibility map from a local field map",
                       description="Writes DIR/<stem>_<method>_chi-mean.nii.gz (ppm), DIR/<stem>_<method>_chi-std.nii.gz "
                                   "for PDI methods, and DIR/<stem>_<method>_run.json (settings, versions, device, "
                                   "timings), as one set: all or nothing. Existing outputs are replaced only with "
                                   "--overwrite. Exit codes: 0 done, 1 a folder run with failed subjects, 2 bad "
                                   "input, 130 interrupted, 143 terminated.")
    r.add_argument("field", type=Path, help="local field map (NIfTI), units set by --units; or a folder of "
                                            "subjects (see --field-pattern), each done once")
    r.add_argument("--mask", type=Path, help="brain mask (NIfTI, > 0 inside), same grid as the field (required for a file)")
    r.add_argument("--magnitude", type=Path, help="magnitude image: edges are spared by MEDI's TV (gradient mask)")
    r.add_argument("--noise-std", type=Path, help="field noise standard deviation map: data weight W = mask / N_std")
    r.add_argument("--noisy-regions", choices=defaults.NOISY_REGIONS, default="auto", help=NOISY_REGIONS_HELP)
    r.add_argument("--field-mean", choices=defaults.FIELD_MEAN, default="remove", help=FIELD_MEAN_HELP)
    r.add_argument("--field-trend", choices=defaults.FIELD_TREND, default="keep", help=FIELD_TREND_HELP)
    r.add_argument("--medi-edges", choices=defaults.MEDI_EDGES, default="magnitude",
                   help="MEDI's edge mask: from --magnitude (default; without one, TV everywhere) or from PDI's map of "
                        "the same field (pdi: its 0.7 N strongest gradient components are spared, lambda 8x; ten realistic "
                        "simulated brains: 50.9 %% against PDI's 49.8 and MEDI's 56.0, sharp boundaries 47.0 against "
                        "47.8 and 51.8; but on simulated bleeds 42.7 against MEDI's own edges' 33.8, README)")
    r.add_argument("--method", choices=METHODS, default=defaults.METHOD,
                   help=f"reconstruction method (default: {defaults.METHOD})")
    r.add_argument("--lambda", dest="lam", type=float, help="regularisation weight; default for MEDI and Tikhonov: automatic, c x s^2 "
                   "with s the field's effective noise read off the magic-angle cone (run.json records it); "
                   f"PDI-VI1: {defaults.VI_LAMBDA_PDI_EDGES:g} with its edges from PDI's map (the default without a "
                   f"magnitude, --vi-edges), {defaults.VI_LAMBDA:g} with a magnitude's or none")
    r.add_argument("--iterations", type=int, help="iterations: MEDI's maximum (default 200), PDI-VI's count")
    r.add_argument("--threshold", type=float, default=defaults.TKD_THRESHOLD,
                   help=f"TKD truncation threshold (default {defaults.TKD_THRESHOLD})")
    _add_field_units(r)
    r.add_argument("--volume", type=int, help="index of the volume to use when the field is 4D")
    r.add_argument("--pad", type=float, help="zero-padding factor for the FFT (>= 1; default 1.5 for TKD and "
                                              "Tikhonov, 1 for MEDI)")
    r.add_argument("--device", default=defaults.DEVICE, choices=("auto", "cpu", "cuda", "mps"), help="where PDI runs")
    r.add_argument("--weights", type=Path, help="PDI weights (.safetensors with its .json manifest); default: bundled")
    r.add_argument("--reflections", type=int, default=defaults.PDI_REFLECTIONS, choices=defaults.REFLECTION_COUNTS,
                   help="PDI: the network's maps averaged over this many mirrorings of the input (2: the field and "
                        "its point reflection, an exact symmetry of the dipole kernel; n times the time; on ten "
                        "held-out realistic brains 2 passes were 0.9 point better than 1 on every brain, 8 another "
                        f"0.4; default {defaults.PDI_REFLECTIONS})")
    r.add_argument("--seed", type=int, default=0, help="random seed (PDI-VI sampling)")
    _add_vi(r)
    r.add_argument("--out-dir", type=Path, required=True, help="output folder (created if needed)")
    r.add_argument("--naming", choices=("pdiqsm", "bids"), help="output names: <stem>_<method>_chi-mean (default for a "
                   "file) or BIDS-style <entities>_desc-<method>_Chimap with desc-<method>Std and a JSON sidecar "
                   "(default for a folder)")
    r.add_argument("--field-pattern", default="*_localfield.nii*", help="folder mode: field files to find (recursive)")
    r.add_argument("--mask-suffix", default="mask", help="folder mode: the mask is the field's name with its last "
                   "_<suffix> replaced by _<mask-suffix>")
    r.add_argument("--labels", type=Path, help="region labels (NIfTI, integers; nearest-neighbour resampled when on "
                   "another sampling of the same space): writes <stem>_<method>_regions.tsv beside the maps (see 'pdiqsm "
                   "stats')")
    r.add_argument("--labels-suffix", help="folder mode: each subject's labels are <name>_<suffix>.nii[.gz] beside its "
                   "field; also writes group_desc-<method>Regions_stats.tsv (a column per subject)")
    _add_region_options(r)
    r.add_argument("--overwrite", action="store_true", help="replace this method's existing outputs (folder mode: "
                   "redo subjects done with this method; without it, those done with the same settings are skipped)")
    _add_common(r)

    s = sub.add_parser("simulate", help="a phantom and its local field with noise (seeded)")
    s.add_argument("kind", choices=("sphere", "cylinder", "brain", "shapes", "ich", "realistic"),
                   help="phantom type; realistic: an MNI152 brain with the training simulator's non-dipolar field "
                        "terms and its deep-nuclei labels (labels.nii.gz, labels.tsv); --shape is then the largest "
                        "field of view (the brain's own size otherwise; --noise does not apply)")
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("NX", "NY", "NZ"))
    s.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("DX", "DY", "DZ"))
    s.add_argument("--b0-dir", type=float, nargs=3, default=(0.0, 0.0, 1.0), metavar=("X", "Y", "Z"))
    s.add_argument("--noise", type=float, default=1e-3, help="field noise standard deviation, ppm (default 1e-3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sharp", action="store_true",
                   help="realistic: one brain's tissue boundaries instead of the MNI template's averaged ones (same "
                        "seed, same brain otherwise)")
    s.add_argument("--texture", action="store_true",
                   help="realistic: fine tissue texture in chi (anatomy.tissue_texture: the multi-scale "
                        "heterogeneity of real tissue; same seed, same brain otherwise)")
    s.add_argument("--data-dir", type=Path, help="for 'ich': folder with chi_ppm, mask, noise_std (default ../shared/data)")
    _add_common(s)

    e = sub.add_parser("evaluate", help="metrics of a reconstruction against the truth")
    e.add_argument("recon", type=Path, help="reconstructed chi (NIfTI, ppm)")
    e.add_argument("--truth", type=Path, required=True, help="true chi (NIfTI, ppm)")
    e.add_argument("--mask", type=Path, required=True)
    e.add_argument("--std", type=Path, help="predicted standard deviation map: adds the calibration columns (share of "
                   "voxels within 1 and 2 sigma, Spearman of sigma and |error|)")
    e.add_argument("--figure", type=Path, help="with --std: write the calibration figure here (PNG: coverage of the "
                   "Gaussian intervals against nominal, and RMS error against sigma by decile)")
    e.add_argument("--json", type=Path, help="also write the table as JSON here")
    _add_common(e)

    st = sub.add_parser("stats", help="region statistics of a chi map, with honest intervals for PDI",
                        description="Per region: voxels, volume, mean, median and spread of chi relative to a reference, "
                                    "and with --std (PDI) the standard deviation of the region's mean and its 95 % "
                                    "interval. The interval accounts for spatially correlated errors (a correlation "
                                    "length and a scale measured on simulated brains, stored beside the weights); "
                                    "the naive independent-voxel width is listed beside it.")
    st.add_argument("chi", type=Path, help="chi map (NIfTI, ppm)")
    st.add_argument("--std", type=Path, help="its standard deviation map (PDI), same grid")
    st.add_argument("--labels", type=Path, required=True, help="region labels (NIfTI, integers)")
    st.add_argument("--mask", type=Path, help="brain mask (default: the voxels where chi is not 0)")
    _add_region_options(st)
    st.add_argument("--samples", type=int, default=0, help="also draw N correlated error samples and list the spread "
                    "of each region's mean over them (a check on the closed form)")
    st.add_argument("--weights", type=Path, help="the weights that made the map: their region calibration is used "
                    "(default: the bundled weights')")
    st.add_argument("--calibration", type=Path, help="a region calibration file (.regions.json) to use instead")
    st.add_argument("--independent", action="store_true", help="treat voxel errors as independent (the naive, "
                    "far too narrow interval)")
    st.add_argument("--out", type=Path, required=True, help="the table: .tsv or .json")
    st.add_argument("--overwrite", action="store_true", help="replace an existing table")
    _add_common(st)

    fs = sub.add_parser("fieldstats", help="how real a local field looks: cone power share, noise levels",
                        description="Prints the statistics that tell real local fields from dipole fields plus white "
                                    "noise (brain-masked, demeaned, no padding, k up to the coarsest axis's Nyquist): "
                                    "std, share of the power in the magic-angle cone |D(k)| < 0.1 and that cone's share "
                                    "of k-space, white noise by second differences, and the effective noise read off "
                                    "the cone (what the automatic lambda uses). Real 3 T brains: cone share 5-9 %; a "
                                    "dipole field plus white noise: 1-2 %.")
    fs.add_argument("field", type=Path, help="local field map (NIfTI), units set by --units")
    fs.add_argument("--mask", type=Path, required=True)
    _add_field_units(fs)
    fs.add_argument("--json", type=Path, help="also write the statistics as JSON here")
    _add_common(fs)

    t = sub.add_parser("train", help="supervised Bayesian training on simulated data (Eq. 9), resumable")
    t.add_argument("--preset", default="default", help="architecture preset: default, paper, tiny")
    t.add_argument("--steps", type=int, required=True, help="train until this many steps in total")
    t.add_argument("--out", type=Path, required=True, help="checkpoint file; resumed from if it exists")
    t.add_argument("--log", type=Path, help="append one JSON line per step here (default: <out>.log.jsonl)")
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--validate-every", type=int, default=250)
    t.add_argument("--pool-size", type=int, default=8, help="simulated volumes kept in memory to draw patches from")
    t.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("NX", "NY", "NZ"))
    t.add_argument("--brain-fov", type=float, nargs=3, default=(128.0, 150.0, 120.0), metavar=("X", "Y", "Z"),
                   help="field of view (mm) of the simulated brains")
    t.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    t.add_argument("--beta", type=float, default=0.0,
                   help="0: the Gaussian NLL of Eq. 9; 0.5..1: beta-NLL, faster progress of the mean (finish with 0)")
    t.add_argument("--brain-fraction", type=float, default=0.7,
                   help="share of brains among the simulated volumes that are not anatomical, the rest random shapes (default 0.7)")
    def share(flag: str, text: str) -> None:  # one of SHARE_FLAGS
        t.add_argument(flag, type=float, default=0.0, help="share of the anatomical brains " + text)

    share("--sharp-fraction", "given one brain's tissue boundaries instead of the MNI template's averaged ones "
          "(anatomy.sharp_tissue; default 0; the bundled model's steps since 32000 used 0.5); the validation brains "
          "keep the template's, so that the learning curve stays comparable")
    share("--bleed-fraction", "given an acute bleed whose phase is noise, with its noise map (simulation.add_bleed; "
          "the network's inputs then built from that map as at inference; realistic simulator only; default 0; the "
          "bundled model's last CPU steps used 0.15); validation brains have none")
    t.add_argument("--distant-ppm", type=float, nargs=2, default=(0.0, 0.0), metavar=("LO", "HI"),
                   help="realistic fields also carry distant sources' harmonic field, its std in the mask log-uniform "
                        "in LO..HI ppm (fieldterms.distant_harmonics; default 0 0: none, the bundled model's mix); "
                        "validation brains have none")
    share("--column-fraction", "cut in plane to a column 60-110 mm wide (a field of view narrower than the head; "
          "simulation.column_crop; default 0, the bundled model's mix); validation brains are whole")
    share("--texture-fraction", "given fine tissue texture, the multi-scale heterogeneity that a real brain's map "
          "shows and the template's smooth tissue maps lack (anatomy.tissue_texture; benchmarks/results/"
          "truth_texture.md; default 0, the bundled model's mix); validation brains have none")
    t.add_argument("--validation-count", type=int, default=3,
                   help="held-apart simulated brains for validation (seeds 10000-; the bundled line's records use 3)")
    t.add_argument("--ema", type=float, default=0.0,
                   help="keep a moving average of the weights with this decay (e.g. 0.998), validated and exported")
    t.add_argument("--simulator", choices=("realistic", "clean"), default="realistic",
                   help="realistic: MNI152 brains and the non-dipolar field terms of real fields (default); "
                        "clean: procedural brains, dipole field plus white noise (the first models')")
    t.add_argument("--workers", type=int, default=0,
                   help="background processes simulating volumes (0: in the loop, exactly reproducible)")
    t.add_argument("--init-from", type=Path,
                   help="a new run starts from these weights (checkpoint or .safetensors; fitting names and shapes)")
    t.add_argument("--precision", choices=defaults.PRECISIONS, default="auto",
                   help="auto: bf16 autocast on GPUs and on CPUs with bf16 arithmetic, else fp32")
    t.add_argument("--max-seconds", type=float, default=0.0,
                   help="also stop after this many seconds of this run, validated and saved (0: no limit; for leased machines)")
    t.add_argument("--lr-final", type=float, default=0.0,
                   help="> 0: cosine decay of the learning rate from --lr to this over the run (its --max-seconds when given, else its steps)")
    t.add_argument("--flips", action="store_true",
                   help="mirror patches along random axes (a valid sample by the dipole kernel's symmetry; more data per simulated volume)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    _add_common(t)

    f = sub.add_parser("finetune", help="PDI-VI on a set of fields: adapted weights for reconstruct --weights",
                       description="Fine-tunes a copy of the PDI weights without labels (Eq. 11, or Eq. 12 with "
                                   "pdi-vi2) on the given fields, one per iteration in turn, and writes OUT "
                                   "(.safetensors) with its .json manifest; the input weights are not modified.")
    f.add_argument("fields", type=Path, nargs="+", metavar="FIELD", help="local field maps (NIfTI)")
    f.add_argument("--masks", type=Path, nargs="+", required=True, help="one brain mask per field, in order")
    f.add_argument("--noise-std", type=Path, nargs="+", help="one field noise std map per field (data weight W)")
    f.add_argument("--magnitudes", type=Path, nargs="+", help="one magnitude image per field (TV edge mask M)")
    f.add_argument("--noisy-regions", choices=defaults.NOISY_REGIONS, default="auto", help=NOISY_REGIONS_HELP)
    f.add_argument("--field-mean", choices=defaults.FIELD_MEAN, default="remove", help=FIELD_MEAN_HELP)
    f.add_argument("--field-trend", choices=defaults.FIELD_TREND, default="keep", help=FIELD_TREND_HELP)
    f.add_argument("--out", type=Path, required=True, help="adapted weights, NAME.safetensors (NAME.json beside it)")
    f.add_argument("--validation-field", type=Path, help="a field kept apart: the weights with its lowest loss are kept")
    f.add_argument("--validation-mask", type=Path, help="the validation field's mask")
    f.add_argument("--method", choices=("pdi-vi1", "pdi-vi2"), default="pdi-vi1",
                   help="pdi-vi1: TV prior weighted by --lambda; pdi-vi2: flat prior (default pdi-vi1)")
    f.add_argument("--lambda", dest="lam", type=float, help=f"TV weight (default {defaults.VI_LAMBDA_PDI_EDGES:g} "
                   f"with edges from PDI's maps, without magnitudes; {defaults.VI_LAMBDA:g} with them)")
    f.add_argument("--iterations", type=int, default=defaults.VI_ITERATIONS,
                   help=f"iterations in all, over the set (default {defaults.VI_ITERATIONS})")
    _add_vi(f, on_set=True)
    f.add_argument("--weights", type=Path, help="weights to start from (default: bundled)")
    f.add_argument("--units", default="ppm", help=f"field units: {', '.join(UNITS)} (default ppm)")
    f.add_argument("--b0", type=float, help="field strength in tesla (needed for hz and rad)")
    f.add_argument("--te", type=float, help="echo time in seconds (needed for rad)")
    f.add_argument("--b0-dir", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes, for every field (default: from each NIfTI affine)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    f.add_argument("--seed", type=int, default=0)
    _add_common(f)

    x = sub.add_parser("export", help="weights (safetensors + manifest with sha256) from a training checkpoint")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--out", type=Path, required=True, help="NAME.safetensors (NAME.json is written beside it)")
    x.add_argument("--calibrate-std", action="store_true",
                   help="rescale sigma so that it matches the errors on four held-apart simulated brains")
    _add_common(x)

    d = sub.add_parser("demo", help="the main job on built-in data: simulate, reconstruct, figure, metrics")
    d.add_argument("--out-dir", type=Path, default=Path("out/demo"))
    d.add_argument("--seed", type=int, default=0)
    _add_common(d)
    return parser


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Input warnings as one line (``pdiqsm: warning: ...``); others as Python shows them."""
    from .plausibility import InputWarning

    if issubclass(category, InputWarning):
        print(f"pdiqsm: warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress(args.progress)
    warnings.showwarning = _show_warning
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
    unfinished = ""
    if args.command == "reconstruct":
        unfinished = "; this run's unfinished outputs were removed" + (
            " (finished subjects are kept and a rerun resumes after them)" if args.field.is_dir() else "")
    try:
        return COMMANDS[args.command](args, progress)
    except (KeyboardInterrupt, Cancelled):
        print(f"pdiqsm {args.command}: interrupted{unfinished}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"pdiqsm {args.command}: terminated (SIGTERM){unfinished}", file=sys.stderr)
        return 143
    except (InputError, ValueError, RuntimeError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"pdiqsm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _add_vi(p: argparse.ArgumentParser, on_set: bool = False) -> None:
    """The PDI-VI settings shared by reconstruct (per volume) and finetune (on a set)."""
    from .vi import DEFAULT_VARIANT, ESTIMATORS, VARIANCES, VARIANTS, VIConfig

    d = VIConfig()
    p.add_argument("--samples", type=int, default=d.samples,
                   help=f"PDI-VI: Monte Carlo samples K per iteration with --vi-estimator mc (default {d.samples})")
    why = ("the encoder stays frozen, so the adapted weights keep the base sigma" if on_set else
           "as accurate as every weight on realistic brains, better on a bleed, about 0.7x the time")
    p.add_argument("--vi-variant", choices=VARIANTS,
                   help="PDI-VI: tune every weight, the decoders (encoder cached), or each decoder's last level "
                        f"(default {DEFAULT_VARIANT}: {why})")
    p.add_argument("--vi-estimator", choices=ESTIMATORS, default=d.estimator,
                   help="PDI-VI: the KL's expectation by K Monte Carlo samples (mc, the paper's) or in closed "
                        f"form (exact: no sampling noise, one dipole convolution per iteration; default {d.estimator})")
    p.add_argument("--vi-variance", choices=VARIANCES, default=d.variance,
                   help="PDI-VI: sigma from the tuned log-variance decoder (network) or one free log variance per "
                        "voxel started from it (voxel: reaches the mean-field optimum; per volume only, adapted "
                        f"weights keep the base sigma; default {d.variance})")
    p.add_argument("--noise-level", type=_noise_level, default=None,
                   help="PDI-VI: field noise std (ppm) where W = 1, or how to read it from the field: white (second "
                        "differences) or cone (everything no map explains). Default: white while the mean is tuned, "
                        "cone for the sigma reported")
    p.add_argument("--vi-edges", choices=defaults.VI_EDGES, default="auto",
                   help="PDI-VI1: the TV edge mask from the magnitude, or from PDI's own map of the field (pdi: its "
                        "0.7 N strongest gradient components spared, as --medi-edges pdi); auto (default): the "
                        "magnitude when one is given, else PDI's map")
    if not on_set:  # a set's adapted weights are not maps: nothing to keep or blend
        p.add_argument("--vi-where", choices=defaults.VI_WHERE, default="auto",
                       help="PDI-VI: keep the fine-tuned map everywhere (the paper's); only deep in the brain (over "
                            "10 mm from the edge) where the field disagrees with PDI's map beyond a healthy brain's "
                            "residue, PDI's map elsewhere, fine-tuning skipped where it nowhere does (discrepant: on "
                            "healthy simulated brains level with PDI, part of the gain on bleeds); or gated: discrepant "
                            "when PDI's residual is 0.78-1.2 times the field's cone noise level (PDI explains the field "
                            "to its noise floor), else everywhere (a bleed, or a field unlike PDI's training data; "
                            "benchmarks/results/vi_where.md). "
                            "auto (default): gated for PDI-VI1, discrepant for PDI-VI2 (whose flat prior fitted "
                            "everywhere wrecks healthy simulated brains)")
    p.add_argument("--vi-harmonics", choices=defaults.VI_HARMONICS, default="keep",
                   help="PDI-VI's data term: the whole residual (keep, default), or blind to the part that sources "
                        "outside the brain could make (ignore: solid harmonics up to degree 2, e.g. a distant field "
                        "left by background removal; it also loses what a broad error of PDI's map leaves there: "
                        "benchmarks/results/vi_harmonics.md)")
    p.add_argument("--vi-tol", type=float, default=0.01,
                   help="PDI-VI: stop when the mean map moved less than this (relative) over 10 iterations (where "
                        "the fine-tuned map is kept only where the field disagrees, the map returned); 0: run every "
                        "iteration (default 0.01)")
    p.add_argument("--vi-precision", choices=defaults.PRECISIONS, default="auto",
                   help="PDI-VI: the network's passes in fp32 or bf16 (autocast; as accurate, faster on some CPUs and "
                        "slower on others); auto (default): bf16 on a GPU, and on a CPU with bf16 arithmetic whichever "
                        "ran its timed iterations faster, or bf16 where only bf16 fits in memory (the run record says "
                        "which)")


def _noise_level(text: str) -> float | str:
    if text in ("cone", "white"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level in ppm, cone or white, not {text!r}") from None


def _add_region_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--names", type=Path, help="label names: TSV/CSV (index, name), JSON or a FreeSurfer colour table "
                   "(default: <labels>.tsv or labels.tsv beside the labels, if present)")
    p.add_argument("--reference", default="whole-brain", help="what region means are relative to: whole-brain (the "
                   "mean over the mask; default), a label number or name, or none")


def _vi_settings(args) -> dict:
    return dict(samples=args.samples, vi_variant=args.vi_variant, vi_estimator=args.vi_estimator,
                vi_variance=args.vi_variance, noise_level=args.noise_level, vi_tol=args.vi_tol,
                vi_precision=args.vi_precision, vi_edges=args.vi_edges,
                vi_where=getattr(args, "vi_where", "auto"), vi_harmonics=args.vi_harmonics)


def reconstruct_settings(args) -> Settings:
    """The reconstruction settings that parsed ``reconstruct`` arguments stand for."""
    return Settings(method=args.method, lam=args.lam, iterations=args.iterations, pad=args.pad,
                    threshold=args.threshold, device=args.device, medi_edges=args.medi_edges,
                    weights=str(args.weights) if args.weights else None, seed=args.seed,
                    reflections=args.reflections, noisy_regions=args.noisy_regions, field_mean=args.field_mean,
                    field_trend=args.field_trend, **_vi_settings(args))


def cmd_reconstruct(args, progress: Progress) -> int:
    from .pipeline import reconstruct_files, reconstruct_tree, tree_summary

    settings = reconstruct_settings(args)
    if args.field.is_dir():
        entries = reconstruct_tree(args.field, args.out_dir, settings, args.field_pattern, args.mask_suffix,
                                   args.naming or "bids", progress, args.overwrite, args.labels_suffix,
                                   units=args.units, b0=args.b0, te=args.te, b0_dir=args.b0_dir,
                                   names_path=args.names, reference=args.reference)
        for entry in entries:
            said = ", ".join(entry["outputs"]) if entry["status"] == "done" else f"{entry['status']}: {entry['reason']}"
            print(f"{entry['field']}: {said}")
        print(f"pdiqsm reconstruct: {tree_summary(entries)}", file=sys.stderr)
        return 1 if any(e["status"] == "failed" for e in entries) else 0
    if args.mask is None:
        raise InputError("--mask", "a brain mask is required when FIELD is a file")
    record = reconstruct_files(args.field, args.mask, args.out_dir, settings, args.magnitude, args.noise_std,
                               args.units, args.b0, args.te, args.b0_dir, args.params, args.volume, progress,
                               args.naming or "pdiqsm", args.overwrite, args.labels, args.names, args.reference)
    print("\n".join(record["outputs"]))
    return 0


def cmd_simulate(args, progress: Progress) -> int:
    from .simulate_cli import simulate

    for path in simulate(args, progress):
        print(path)
    return 0


def cmd_evaluate(args, progress: Progress) -> int:
    from .evaluation import evaluate_files, format_table
    from .io import write_json_atomic

    if args.figure is not None and args.std is None:
        raise InputError("--figure", "the calibration figure needs the standard deviation map (--std)")
    table = evaluate_files(args.recon, args.truth, args.mask, args.std)
    print(format_table({args.recon.name: table}))
    if args.json:
        write_json_atomic(args.json, table)
    if args.figure is not None:
        from .evaluation import calibration_figure
        from .io import load_volume

        volumes = [load_volume(p, role).data for p, role in ((args.recon, "reconstruction"), (args.std, "std"),
                                                              (args.truth, "truth"), (args.mask, "mask"))]
        print(calibration_figure(args.figure, *volumes, title=args.recon.name))
    return 0


def cmd_stats(args, progress: Progress) -> int:
    from .io import check_same_grid, load_mask, load_volume, write_json_atomic, write_text_atomic
    from .regions import error_model_for, stats_for_files, table_tsv

    out = Path(args.out)
    if out.suffix.lower() not in (".tsv", ".json"):
        raise InputError(str(out), "the table must be .tsv or .json")
    if out.exists() and not args.overwrite:
        raise InputError(str(out), "exists; pass --overwrite to replace it")
    chi = load_volume(args.chi, "chi")
    std = None
    if args.std is not None:
        s = load_volume(args.std, "std")
        check_same_grid(chi, s, "std")
        std = s.data
    if args.mask is not None:
        mask = load_mask(args.mask, chi)
    else:
        mask = chi.data != 0
        if not mask.any():
            raise InputError(str(args.chi), "chi is 0 everywhere; give --mask")
    sha = None
    if args.weights is not None:
        from .weights import sha256

        sha = sha256(Path(args.weights))
    model = error_model_for(std is not None, args.weights, sha, args.calibration, args.independent)
    stats = stats_for_files(chi, mask, args.labels, std, args.names, args.reference, model, args.samples)
    if args.mask is None:
        stats["notes"].insert(0, "mask: the voxels where chi is not 0 (no --mask given)")
    text = table_tsv(stats)
    if out.suffix.lower() == ".json":
        write_json_atomic(out, stats)
    else:
        write_text_atomic(out, text)
    print(text, end="")
    return 0


def cmd_fieldstats(args, progress: Progress) -> int:
    from .fieldstats import NoStatistics, field_stats
    from .io import write_json_atomic
    from .pipeline import load_inputs

    inputs = load_inputs(args.field, args.mask, units=args.units, b0=args.b0, te=args.te, b0_dir=args.b0_dir,
                         params_path=args.params)
    try:
        stats = field_stats(inputs.field_ppm, inputs.mask, inputs.geometry).as_dict()
    except NoStatistics as exc:  # too small a mask, a grid without a cone
        raise InputError(str(args.mask if exc.role == "mask" else args.field), str(exc)) from None
    stats.update(voxel_size_mm=list(inputs.geometry.voxel_size), b0_dir=list(inputs.geometry.b0_dir))
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        write_json_atomic(args.json, stats)
    return 0


def cmd_train(args, progress: Progress) -> int:
    from .inference import pick_device
    from .training import TrainConfig, train, validation_sets

    from dataclasses import replace

    from .simulation import REALISTIC, SimulationConfig

    for flag in SHARE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not 0.0 <= value <= 1.0:
            raise InputError(flag, f"a share between 0 and 1, not {value:g}")
    if args.bleed_fraction > 0 and args.simulator != "realistic":
        raise InputError("--bleed-fraction", "bleeds are put into the realistic simulator's anatomical brains only")
    lo, hi = args.distant_ppm
    if not (0.0 <= lo <= hi and (hi == 0 or lo > 0)):
        raise InputError("--distant-ppm", f"0 0, or bounds 0 < LO <= HI in ppm, not {lo:g} {hi:g}")
    if hi > 0 and args.simulator != "realistic":
        raise InputError("--distant-ppm", "the distant field is one of the realistic simulator's terms")
    base = REALISTIC if args.simulator == "realistic" else SimulationConfig()
    config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, validate_every=args.validate_every, pool_size=args.pool_size,
                         patch=tuple(args.patch), threads=args.threads, beta=args.beta, ema=args.ema,
                         workers=args.workers, precision=args.precision, max_seconds=args.max_seconds,
                         lr_final=args.lr_final, flips=args.flips,
                         simulation=replace(base, brain_fov_mm=tuple(args.brain_fov), brain_fraction=args.brain_fraction,
                                            sharp_fraction=args.sharp_fraction, bleed_fraction=args.bleed_fraction,
                                            distant_ppm=(lo, hi), column_fraction=args.column_fraction,
                                            texture_fraction=args.texture_fraction))
    log_path = args.log or args.out.with_name(args.out.name + ".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    step_fn = progress.task("train")
    with open(log_path, "a") as log_file:
        def log(record: dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            step_fn(record["step"], config.steps)
        rank = int(os.environ.get("RANK", "0"))
        validation, sharp = (validation_sets(args.validation_count, config.simulation)
                             if rank == 0 and args.validate_every > 0 else (None, None))
        train(config, args.out, log, validation, pick_device(args.device), args.init_from, sharp)
    print(args.out)
    return 0


def cmd_finetune(args, progress: Progress) -> int:
    from .pipeline import finetune_files

    if (args.validation_field is None) != (args.validation_mask is None):
        raise InputError("--validation-field", "give --validation-field and --validation-mask together")
    settings = Settings(method=args.method, lam=args.lam, iterations=args.iterations, device=args.device,
                        weights=str(args.weights) if args.weights else None, seed=args.seed,
                        noisy_regions=args.noisy_regions, field_mean=args.field_mean,
                        field_trend=args.field_trend, **_vi_settings(args))
    validation = (args.validation_field, args.validation_mask) if args.validation_field else None
    finetune_files(args.fields, args.masks, args.out, settings, args.noise_std, args.magnitudes, validation,
                   progress, units=args.units, b0=args.b0, te=args.te, b0_dir=args.b0_dir)
    print(args.out)
    return 0


def cmd_export(args, progress: Progress) -> int:
    from .training import export

    print(export(args.checkpoint, args.out, calibrate=args.calibrate_std))
    return 0


def cmd_demo(args, progress: Progress) -> int:
    from .demo import run_demo

    run_demo(args.out_dir, args.seed, progress)
    return 0


COMMANDS = {"reconstruct": cmd_reconstruct, "simulate": cmd_simulate, "evaluate": cmd_evaluate, "fieldstats": cmd_fieldstats, "stats": cmd_stats,
            "train": cmd_train, "finetune": cmd_finetune, "export": cmd_export, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
