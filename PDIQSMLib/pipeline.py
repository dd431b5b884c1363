"""One reconstruction, start to end: arrays + geometry in, mean (and std) out; and the file-level run.

This is the single place where methods are dispatched, shared by the command line and the Slicer
logic, so that both give the same numbers for the same data.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__, defaults, solvers
from .defaults import MEDI_EDGES, METHODS
from .outputs import OutputSet
from .errors import InputError
from .geometry import Geometry, geometry_from_affine, normalise_b0_dir
from .io import Params, Volume, check_same_grid, finite_in_mask, load_mask, load_volume, nifti_stem, read_params
from .progress import Progress
from .plausibility import field_warnings, magnitude_warnings, warn
from .units import ppm_per_unit, to_ppm
from .weighting import (check_noise_std, data_weight, gradient_mask, harmonic_basis, inverse_variance, noisy_regions,
                        without_mean)


@dataclass
class Settings:
    """Every user setting of a reconstruction (defaults are the documented ones)."""

    method: str = "medi"
    lam: float | None = None  # None: the method's default (Tikhonov and MEDI: automatic, from the field's noise)
    samples: int = defaults.VI_SAMPLES
    iterations: int | None = None
    pad: float | None = None  # None: the method's default (1.5 for TKD and Tikhonov, 1 for MEDI)
    threshold: float = defaults.TKD_THRESHOLD
    device: str = defaults.DEVICE
    weights: str | None = None
    seed: int = 0
    vi_variant: str | None = None  # which weights PDI-VI tunes: full, decoders, last (None: full per volume, decoders on a set)
    vi_estimator: str = "exact"  # PDI-VI's expectation: exact (closed form) or mc (K samples)
    vi_variance: str = "voxel"  # PDI-VI's sigma: voxel or network
    noise_level: float | str | None = None  # PDI-VI: field noise (ppm) where W = 1, or how to read it: cone, white (None: white to tune, cone for sigma)
    reflections: int = defaults.PDI_REFLECTIONS  # PDI: mirrored inputs averaged (1, 2, 4, 8; inference.REFLECTIONS)
    vi_tol: float = 0.01  # PDI-VI stops when its mean map moved less than this over 10 iterations (0: never)
    vi_precision: str = "auto"  # PDI-VI's network passes: auto (bf16 where timed faster on a CPU), bf16, fp32
    medi_edges: str = "magnitude"  # MEDI's edge mask M: from --magnitude (none given: TV everywhere) or 'pdi' (PDI's map)
    vi_edges: str = "auto"  # PDI-VI1's edge mask M: auto (the magnitude if given, else PDI's map), magnitude, pdi
    vi_harmonics: str = "keep"  # PDI-VI's data term: the whole residual, or blind to low-order harmonics (ignore)
    vi_where: str = "auto"  # PDI-VI's map kept everywhere, where the field disagrees with PDI's (discrepant), or gated
    # between the two; auto: PDI-VI1 gated, PDI-VI2 discrepant (defaults.VI_WHERE_AUTO; vi_where())
    noisy_regions: str = "auto"  # no noise map given: auto finds where the field is noise (weighting.noisy_regions); off
    field_mean: str = "remove"  # the field's mean in the mask removed first (without_mean), or kept
    field_trend: str = "keep"  # remove: a linear harmonic fitted jointly with PDI's map taken off first (without_trend)

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError("--method", f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.lam is not None and (not np.isfinite(self.lam) or self.lam < 0):
            raise InputError("--lambda", f"must be a finite number >= 0, got {self.lam}")
        if self.method == "tikhonov" and self.lam == 0:
            raise InputError("--lambda", "Tikhonov needs a weight > 0 (0 leaves the cone's null space undetermined)")
        if self.method == "tkd" and not 0 < self.threshold < 2 / 3:
            raise InputError("--threshold", f"TKD's truncation of |D| must lie in (0, 2/3), got {self.threshold}")
        if self.samples < 1:
            raise InputError("--samples", f"must be >= 1, got {self.samples}")
        if self.iterations is not None and self.iterations < 1:
            raise InputError("--iterations", f"must be >= 1, got {self.iterations}")
        if self.pad is not None and not self.pad >= 1.0:
            raise InputError("--pad", f"padding factor must be >= 1, got {self.pad}")
        if isinstance(self.noise_level, str) and self.noise_level not in ("cone", "white"):
            raise InputError("--noise-level", f"expected a level in ppm, cone or white, got {self.noise_level!r}")
        if self.reflections not in defaults.REFLECTION_COUNTS:
            raise InputError("--reflections", f"expected one of {defaults.REFLECTION_COUNTS}, got {self.reflections}")
        if self.vi_precision not in defaults.PRECISIONS:
            raise InputError("--vi-precision", f"expected one of {', '.join(defaults.PRECISIONS)}, got {self.vi_precision!r}")
        if not self.vi_tol >= 0:
            raise InputError("--vi-tol", f"must be >= 0, got {self.vi_tol}")
        if self.medi_edges not in MEDI_EDGES:
            raise InputError("--medi-edges", f"expected one of {', '.join(MEDI_EDGES)}, got {self.medi_edges!r}")
        if self.noisy_regions not in defaults.NOISY_REGIONS:
            raise InputError("--noisy-regions",
                             f"expected {' or '.join(defaults.NOISY_REGIONS)}, got {self.noisy_regions!r}")
        if self.vi_where not in defaults.VI_WHERE:
            raise InputError("--vi-where", f"expected one of {', '.join(defaults.VI_WHERE)}, got {self.vi_where!r}")
        if self.field_trend not in defaults.FIELD_TREND:
            raise InputError("--field-trend", f"expected {' or '.join(defaults.FIELD_TREND)}, got {self.field_trend!r}")
        if self.field_mean not in defaults.FIELD_MEAN:
            raise InputError("--field-mean", f"expected {' or '.join(defaults.FIELD_MEAN)}, got {self.field_mean!r}")
        if self.vi_harmonics not in defaults.VI_HARMONICS:
            raise InputError("--vi-harmonics",
                             f"expected {' or '.join(defaults.VI_HARMONICS)}, got {self.vi_harmonics!r}")
        if self.vi_edges not in defaults.VI_EDGES:
            raise InputError("--vi-edges", f"expected one of {', '.join(defaults.VI_EDGES)}, got {self.vi_edges!r}")

    def applicable(self) -> dict:
        """The settings this method reads (what a run record lists; the others would mislead a reader).
        ``lam`` None means automatic (the record's result says the value and the rule)."""
        used = {"tkd": ("threshold", "pad"), "tikhonov": ("lam", "pad"), "medi": ("lam", "iterations", "pad"),
                "pdi": ("device", "weights", "reflections"),
                "pdi-vi1": ("lam", "samples", "iterations", "device", "weights", "seed", "vi_variant", "vi_estimator",
                            "vi_variance", "noise_level", "vi_tol", "vi_precision", "vi_edges", "vi_where",
                            "vi_harmonics"),
                "pdi-vi2": ("samples", "iterations", "device", "weights", "seed", "vi_variant", "vi_estimator",
                            "vi_variance", "noise_level", "vi_tol", "vi_precision", "vi_where")}[self.method]
        if self.method not in defaults.WITHOUT_NOISE_MAP:
            used += ("noisy_regions",)
        if self.method == "medi":
            used += ("medi_edges",) + (("device", "weights") if self.medi_edges == "pdi" else ())
        if self.vi_estimator == "exact":  # K is read only when samples are drawn
            used = tuple(k for k in used if k != "samples")
        values = asdict(self)
        return {"method": self.method, **{k: values[k] for k in used + ("field_mean", "field_trend")}}


@dataclass
class Result:
    mean: np.ndarray
    std: np.ndarray | None
    info: dict = field(default_factory=dict)


def _auto_lambda(method: str, field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, info: dict) -> float:
    """The automatic lambda of ``method`` for this field (``solvers.auto_lambda`` of its cone noise; for
    MEDI the field weighted by W, whose noise is the one where W = 1); recorded in ``info``."""
    from .fieldstats import cone_noise

    noise = cone_noise(field_ppm, mask, geometry)
    info["lambda_rule"] = f"auto: {solvers.AUTO_LAMBDA_PER_NOISE2[method]:g} x (cone noise {noise:.5f} ppm)^2"
    return solvers.auto_lambda(method, noise)


def reconstruct(field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, settings: Settings,
                magnitude: np.ndarray | None = None, noise_std: np.ndarray | None = None,
                progress: Progress | None = None) -> Result:
    """Susceptibility (ppm) from a local field (ppm) inside ``mask``."""
    settings.check()
    progress = progress or Progress("none")
    m = np.asarray(mask) > 0
    if not m.any():
        raise InputError("mask", "the mask is empty (no voxel > 0)")
    check_finite(field_ppm, m, "field")
    check_noise_readable(field_ppm, m, geometry, settings)
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    mt = torch.from_numpy(m.astype(np.float32))
    info: dict = {"method": settings.method}
    std = None
    from . import memory

    vi = settings.method.startswith("pdi-vi")
    precision = vi_memory_precision(settings, m.shape, m, info, progress) if vi else "fp32"
    if "vi_precision_for_memory" in info:  # fp32 would not fit, bf16 does: the run takes it
        settings = replace(settings, vi_precision=precision)
    need = memory.estimate_bytes(settings.method, m.shape, m, settings.pad, precision, settings.vi_variant,
                                 settings.vi_harmonics == "ignore")
    tile = memory.check(settings.method, m.shape, need, settings.pad, precision=precision,
                        variant=settings.vi_variant)  # refuses what cannot fit; PDI: tiles
    info["memory_estimate_gib"] = round(need / 2**30, 2)
    if tile is not None:
        info["tile"] = tile
        progress.status(f"{settings.method}: the volume does not fit in memory at once; running in tiles of {tile}")
    given = noise_std is not None  # a noise map from the user (not read off the field): PDI refills (REFILLS)
    if settings.method not in defaults.WITHOUT_NOISE_MAP:
        noise_std, found = noise_map(field_ppm, m, noise_std, settings)
        if found:
            info["noisy_regions"] = {"voxels": found, "read_off": "the field (no noise map given)"}
            progress.status(f"{found} voxels whose field is noise (a bleed?) are down-weighted as a noise map would; "
                            "--noisy-regions off trusts them")
    field_ppm = as_read(field_ppm, m, geometry, settings, noise_std, progress, info)
    b = torch.from_numpy(np.where(m, field_ppm, 0.0).astype(np.float32))
    if settings.method == "tkd":
        chi = solvers.tkd(b, mt, geometry, settings.threshold, settings.pad or solvers.CLOSED_FORM_PAD)
    elif settings.method == "tikhonov":
        lam = settings.lam if settings.lam is not None else _auto_lambda("tikhonov", field_ppm, m, geometry, info)
        chi = solvers.tikhonov(b, mt, geometry, lam, settings.pad or solvers.CLOSED_FORM_PAD)
        info["lambda"] = lam
    elif settings.method == "medi":
        w = torch.from_numpy(data_weight(m, noise_std))
        if settings.medi_edges == "pdi":
            edges = _pdi_edges(field_ppm, m, geometry, settings, magnitude, noise_std, progress, info)
            rule = "medi-pdi-edges"
        else:
            edges, rule = torch.from_numpy(gradient_mask(m, magnitude, geometry.voxel_size)), "medi"
        lam = settings.lam if settings.lam is not None else _auto_lambda(rule, field_ppm * w.numpy(), m, geometry, info)
        run: dict = {}
        chi = solvers.medi(b, mt, geometry, lam, w, edges, settings.pad or 1.0,
                           settings.iterations or solvers.MEDI_MAX_ITER, info=run,
                           progress=progress.task("medi", may_stop_early=True))  # it stops when converged
        info.update({"lambda": lam, "medi": run})
        if not run["converged"]:
            warn(f"MEDI stopped at its iteration limit ({run['iterations']}) before converging (relative change "
                 f"{run['relative_change']:.2g} > {run['tolerance']:g}); the map may be under-regularised or "
                 "streaky: pass a larger --iterations")
    else:
        chi, std = _pdi(field_ppm, m, geometry, settings, magnitude, noise_std, progress, info, tile, refill=given)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return Result(chi.numpy().astype(np.float32), std, info)


def vi_memory_precision(settings: Settings, shape, mask, info: dict, progress: Progress) -> str:
    """The precision PDI-VI's memory is estimated at ('fp32' or 'bf16'): as asked; for 'auto', bf16 where the network
    runs in bf16 throughout (a GPU that has it), fp32 on a CPU (its timing trial runs fp32 first,
    ``vi.PrecisionTrial``), unless fp32 would not fit and the CPU has bf16: then the run takes bf16 (recorded in
    ``info`` and said), or is refused with bf16's figures (``memory.check``)."""
    from . import memory
    from .inference import pick_device
    from .network import use_bf16

    if settings.vi_precision != "auto":
        return settings.vi_precision
    device = pick_device(settings.device)
    if not use_bf16("auto", device):
        return "fp32"
    if device != "cpu":
        return "bf16"
    fp32, bf16 = (memory.estimate_bytes(settings.method, shape, mask, settings.pad, p, settings.vi_variant,
                                        settings.vi_harmonics == "ignore") for p in ("fp32", "bf16"))
    if memory.fits(fp32):
        return "fp32"
    if memory.fits(bf16):  # else memory.check refuses, naming the largest volume that fits in bf16
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        info["vi_precision_for_memory"] = (f"bf16: in fp32 the fine-tuning would need about {gib(fp32)}, more than "
                                           f"the {gib(memory.budget_bytes())} this machine can give it; in bf16 "
                                           f"{gib(bf16)}")
        progress.status(f"{settings.method} runs in bf16 (--vi-precision auto): in fp32 it would need about "
                        f"{gib(fp32)}, more than this machine can give it")
    return "bf16"


def pdi_tile(mask: np.ndarray, pad: float | None) -> int | None:
    """The tile PDI runs in on ``mask``'s box when it does not fit in memory at once, else None (``memory.check``)."""
    from . import memory

    return memory.check("pdi", mask.shape, memory.estimate_bytes("pdi", mask.shape, mask, pad), pad)


def as_read(field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, settings: Settings, noise_std,
            progress: Progress, info: dict) -> np.ndarray:
    """The field as every method reads it: its mean in the mask taken off (``--field-mean remove``, ``without_mean``)
    and, when asked, its linear trend (``--field-trend remove``, ``without_trend``); ``info`` records what was."""
    if settings.field_mean == "remove":
        field_ppm, offset = without_mean(field_ppm, mask, noise_std)
        info["field_mean_removed_ppm"] = round(offset, 7)
    if settings.field_trend == "remove":
        field_ppm = without_trend(field_ppm, mask, geometry, settings, noise_std, progress, info)
    return field_ppm


TREND_ROUNDS = 3  # alternations of without_trend: PDI's map of the field less the trend, the trend refitted


def without_trend(field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, settings: Settings, noise_std,
                  progress: Progress, info: dict) -> np.ndarray:
    """The field less a constant and linear trend (harmonic: what distant sources and background removal may leave)
    fitted jointly with PDI's map of it (``--field-trend remove``): ``TREND_ROUNDS`` times, PDI (one pass, no
    reflection) maps the field less the trend so far, and the trend is refitted to what that map's field leaves (least
    squares in the mask, weighted by the noise map's inverse variance); recorded in ``info['field_trend']``. A plain
    fit would take the brain's own linear part too (0.7 points lost on clean simulated brains, seeds 45000-45003), a
    fit beside a Tikhonov map misread a trend along B0 on one of them (session 38)."""
    from .physics import simulate_field

    m = np.asarray(mask) > 0
    tile = pdi_tile(m, settings.pad)
    f = np.asarray(field_ppm, np.float64)
    basis = harmonic_basis(m, geometry.voxel_size, 1)  # 1, x, y, z per 100 mm about the mask's centre
    w = inverse_variance(m, noise_std)
    w = np.ones(len(basis)) if w is None else w
    guide = replace(settings, method="pdi", reflections=1)
    trend = np.zeros(len(basis))
    for k in range(TREND_ROUNDS):
        progress.status(f"fitting the field's linear trend beside PDI's map ({k + 1}/{TREND_ROUNDS})")
        g = np.zeros(m.shape, np.float32)
        g[m] = f[m] - trend
        run: dict = {}
        chi, _ = _pdi(g, m, geometry, guide, None, noise_std, progress, run, tile)
        left = f[m] - simulate_field(chi.float(), geometry, solvers.CLOSED_FORM_PAD).numpy()[m]
        coef = np.linalg.lstsq(basis * np.sqrt(w)[:, None], left * np.sqrt(w), rcond=None)[0]
        trend = basis @ coef
    info["field_trend"] = {"removed_ppm": round(float(coef[0]), 7),
                           "ppm_per_100mm_along_voxel_axes": [round(float(c), 6) for c in coef[1:]],
                           "fitted": f"beside PDI's one-pass map, {TREND_ROUNDS} rounds"}
    out = np.zeros(m.shape, np.float32)
    out[m] = f[m] - trend
    return out


def _pdi_edges(field_ppm, mask, geometry, settings: Settings, magnitude, noise_std, progress: Progress,
               info: dict) -> torch.Tensor:
    """MEDI's edge mask M from PDI's map of the same field (``--medi-edges pdi``): the magnitude rule of
    ``gradient_mask`` applied to the network's map, sparing its ``solvers.PDI_EDGE_FRACTION`` x N strongest gradient
    components (N the mask's voxels)."""
    if magnitude is not None:
        raise InputError("--medi-edges", "'pdi' takes MEDI's edges from PDI's map, not from --magnitude: give one of "
                                         "the two (--medi-edges magnitude uses the magnitude)")
    guide = replace(settings, method="pdi")
    tile = pdi_tile(mask, settings.pad)
    run: dict = {}
    chi, _ = _pdi(field_ppm, mask, geometry, guide, None, noise_std, progress, run, tile)
    info["edges"] = {"from": "pdi", "spared": f"the {solvers.PDI_EDGE_FRACTION:g} N strongest gradient components",
                     **{k: run[k] for k in ("device", "weights_sha256")}}
    return torch.from_numpy(gradient_mask(mask, chi.numpy(), geometry.voxel_size, solvers.PDI_EDGE_FRACTION))


def _pdi(field_ppm, mask, geometry, settings: Settings, magnitude, noise_std, progress: Progress, info: dict,
         tile: int | None = None, refill: bool = False):
    """PDI, or PDI-VI fine-tuned on this field: (mean tensor, std array); fills ``info``. ``refill``: where the noise
    map marks voxels unreliable, their field in the network's inputs is predicted by PDI's own map
    (``network_io.REFILLS``; PDI runs again, PDI-VI starts from those inputs; only for a noise map given, not one
    read off the field: there it gained nothing, benchmarks/results/refill_*.md). A volume whose B0 lies nearest
    another voxel axis than the third is read relabelled (``geometry.network_axes``, ``_pdi_relabelled``). PDI-VI
    fine-tunes on the grid as given: on one finer than the training's its map takes no coarse band from blocks
    (``_pdi_map``), the field's fidelity sets it (0.8 mm iso, seeds 45000-45002, session 38: the fine-tuned map alone
    57.6 % demeaned NRMSE on average, with the tuned network's band from blocks 58.6, with PDI's 58.1, PDI 58.1)."""
    order, geometry_r, arrays = network_frame(geometry, field_ppm, mask, magnitude, noise_std)
    if order != (0, 1, 2):  # B0 nearest another voxel axis: the network reads the volume relabelled, maps come back
        return _pdi_relabelled(order, geometry_r, arrays, settings, progress, info, tile, refill)
    from .inference import pick_device
    from .weights import load_model

    device = pick_device(settings.device)
    net, manifest = load_model(settings.weights, device)
    info.update(device=device, weights_sha256=manifest["sha256"])
    weight = data_weight(mask, noise_std)
    refills = 0
    if noise_std is not None and net.config.prior != "none":
        from .network_io import REFILLS, UNRELIABLE_WEIGHT, unreliable_voxels

        # voxels whose field the network reads as the prior's prediction (network_io.network_inputs)
        info["field_replaced_voxels"] = int(unreliable_voxels(mask, weight).sum())
        info["field_replaced_below_weight"] = f"{UNRELIABLE_WEIGHT:g} x median W"
        refills = REFILLS if refill and info["field_replaced_voxels"] else 0
    if refills:
        info["field_replaced_from"] = (f"PDI's own map ({refills} refill(s); its first pass: the weighted Tikhonov "
                                       "prior's)")
    if settings.method == "pdi":
        mean, std, _, _ = _pdi_map(net, field_ppm, mask, geometry, settings.reflections, weight, refills, tile,
                                   device, progress, trained_voxels(manifest), info)
        return torch.from_numpy(mean), std
    from . import vi

    config = vi_config(settings, takes_pdi_edges(vi_edges(settings), magnitude is not None))
    blend, inputs, one_pass, where = None, None, None, vi_where(settings)
    info["vi_where"] = {}
    if where != "everywhere":
        from .weighting import (DISCREPANCY_DEPTH_MM, DISCREPANCY_RATIO, GATE_BAND, discrepant_region, gate_ratios,
                                gated, weighted_residual)

        first, first_std, inputs, one_pass = _pdi_map(net, field_ppm, mask, geometry, settings.reflections, weight,
                                                      refills, tile, device, progress, trained_voxels(manifest), info)
        residual = weighted_residual(field_ppm, mask, geometry, weight, first)
        if where == "gated":  # discrepant where PDI explains the field to its noise floor: see residual_over_cone
            ratio, free_ratio = gate_ratios(field_ppm, mask, geometry, weight, residual)
            info["vi_where"]["gate"] = {"residual_over_cone": round(ratio, 4), "discrepant_within": list(GATE_BAND),
                                        "without_harmonics": round(free_ratio, 4)}
            where = gated(ratio)
            progress.status(f"PDI's residual is {ratio:.2f} x the field's cone noise level ({free_ratio:.2f} without "
                            "its low-order harmonics): fine-tuned map kept "
                            + ("everywhere" if where == "everywhere" else "only where the field disagrees with PDI's")
                            + f" (--vi-where gated: there within {GATE_BAND[0]:g}-{GATE_BAND[1]:g})")
            if ratio > GATE_BAND[1] >= free_ratio and settings.vi_harmonics == "keep":
                hint = ("over the band only by its low-order harmonic part: a field of sources outside the brain "
                        "(background removal's residue), which fine-tuning would fit into chi (compare with "
                        "--vi-harmonics ignore or --field-trend remove), or a broad error of PDI's map")
                info["vi_where"]["gate"]["note"] = hint
                progress.status(f"warning: PDI's residual is {hint}")
    info["vi_where"]["kept"] = where
    if "fine_grid" in info and where == "everywhere":  # the gate's PDI pass took blocks; the map returned does not
        info["fine_grid"]["in_map_returned"] = "no: the fine-tuned map, its coarse band set by the field's fidelity"
    if where == "discrepant":
        blend = discrepant_region(field_ppm, mask, geometry, weight, first, residual=residual)
        taken = int((blend > 0.5).sum())
        info["vi_where"].update(rule=f"deeper than {DISCREPANCY_DEPTH_MM:g} mm, where PDI's weighted residual's local "
                                     f"RMS exceeds {DISCREPANCY_RATIO:g} times its median there",
                                voxels=taken, share_of_mask=round(taken / max(int((mask > 0).sum()), 1), 5))
        if not blend.any():
            info["vi_where"]["fine_tuned"] = "no: PDI's map explains the field deep in the brain (its map returned)"
            progress.status("PDI's map explains the field deep in the brain: nothing fine-tuned, its map returned "
                            "(--vi-where everywhere fine-tunes anyway)")
            return torch.from_numpy(first), first_std
        progress.status(f"the field disagrees with PDI's map in {taken} voxels "
                        f"({100 * info['vi_where']['share_of_mask']:.2f} % of the mask): fine-tuned map kept there")
    volume = vi_volume(net, field_ppm, mask, geometry, magnitude, noise_std, device, vi_edges(settings), info, refills,
                       inputs, one_pass, settings.vi_harmonics)
    if settings.vi_harmonics == "ignore":
        info["vi_harmonics"] = f"ignored: the data term blind to the solid harmonics up to degree {vi.BLIND_DEGREE}"
    if blend is not None:  # converged when the map returned stopped moving (vi.MapChange)
        volume.keep(blend, first)
    progress.status(f"fine-tuning PDI ({settings.method}, {config.variant}) on {device}")
    result = vi.finetune(net, [volume], config, progress.task("vi", may_stop_early=config.tol > 0))
    mean, std = result.predict(volume)
    info.update(vi_summary(config, result, kept_in_part=blend is not None))
    progress.status(tuned_text(info))
    if blend is not None:  # the fine-tuned map where the field disagrees with PDI's, PDI's elsewhere
        mean = blend * mean + (1.0 - blend) * first
        std = np.sqrt(blend * std**2 + (1.0 - blend) * first_std**2).astype(std.dtype)
    return torch.from_numpy(mean), std


def trained_voxels(manifest: dict) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """(the finest, the coarsest) voxel side (mm) the weights were trained on along each of the network's axes (in
    plane, in plane, slices: B0's axis), from their manifest's simulation settings; an axis the manifest is silent on
    takes the other's range; None when it gives neither."""
    simulation = (manifest.get("train_config") or {}).get("simulation") or {}
    ranges = {k: (float(simulation[k][0]), float(simulation[k][-1])) for k in ("in_plane_mm", "slice_mm")
              if isinstance(simulation.get(k), (list, tuple))}
    if not ranges:
        return None
    plane, thick = ranges.get("in_plane_mm", ranges.get("slice_mm")), ranges.get("slice_mm", ranges.get("in_plane_mm"))
    return (plane[0], plane[0], thick[0]), (plane[1], plane[1], thick[1])


def relabel(order, *arrays):
    """Each array (or None) with its voxel axes taken in ``order``, contiguous (``geometry.network_axes``)."""
    return tuple(None if a is None else np.ascontiguousarray(np.transpose(np.asarray(a), order)) for a in arrays)


def network_frame(geometry: Geometry, *arrays) -> tuple[tuple[int, int, int], Geometry, tuple]:
    """(the axis order PDI's network reads this volume in, ``geometry`` and ``arrays`` in that order): B0's nearest
    axis last (``geometry.network_axes``); as given when that is already the third."""
    from .geometry import network_axes, permuted

    order = network_axes(geometry)
    if order == (0, 1, 2):
        return order, geometry, arrays
    return order, permuted(geometry, order), relabel(order, *arrays)


def _pdi_relabelled(order, geometry, arrays, settings, progress, info, tile, refill):
    """``_pdi`` on the volume relabelled by ``network_frame`` (``order``, its ``geometry`` and its field, mask,
    magnitude and noise std), its maps put back in the input's order."""
    k = order[2]
    info["network_axes"] = {"order": list(order), "why": f"B0 lies nearest voxel axis {k}; the network was trained "
                                                         "with B0 near its third axis (maps in the input's order)"}
    progress.status(f"B0 lies nearest voxel axis {k}: the network reads the volume with that axis last")
    field_r, mask_r, magnitude_r, noise_r = arrays
    mean, std = _pdi(field_r, mask_r, geometry, settings, magnitude_r, noise_r, progress, info, tile, refill)
    back = tuple(int(i) for i in np.argsort(order))
    mean_b, std_b = relabel(back, mean.numpy(), std)
    return torch.from_numpy(mean_b), std_b


def _pdi_map(net, field_ppm, mask, geometry, reflections: int, weight, refills: int, tile, device,
             progress: Progress, trained: tuple | None = None, info: dict | None = None):
    """PDI's map (``reflections`` passes averaged), its std, the network's inputs it was read from (refilled
    ``refills`` times) and the unmirrored pass's map of them (PDI-VI1's edges, ``vi_volume``). On a grid finer than
    ``trained`` (the training's (finest, coarsest) voxel sides per axis, ``trained_voxels``) the map's coarse band comes
    from the network's map of the block-averaged field (``scales``; recorded in ``info['fine_grid']``); the std is the
    fine run's."""
    from .inference import predict
    from .network_io import network_inputs, refilled
    from .scales import block_mean, coarse_factors, combined

    passes: list = []

    def run(inputs):
        passes.clear()
        return predict(net, field_ppm, mask, device, tile=tile, geometry=geometry, weight=weight,
                       reflections=reflections, inputs=inputs, passes=passes)

    progress.status(f"running PDI on {device}")
    inputs = network_inputs(net.config.prior, field_ppm, mask, geometry, weight)
    mean, std = run(inputs)
    for _ in range(refills):  # the replaced voxels' field predicted by PDI's own map (network_io.REFILLS)
        progress.status(f"running PDI on {device} again, the replaced voxels' field from its first map")
        inputs = refilled(inputs, mask, geometry, weight, mean)
        mean, std = run(inputs)
    one_pass = passes[0][0]
    f = coarse_factors(geometry.voxel_size, *trained) if trained else None
    if f is not None:
        from .fieldstats import noise_problem

        coarse_geometry = Geometry(tuple(v * k for v, k in zip(geometry.voxel_size, f)), geometry.b0_dir)
        field_c, mask_c = block_mean(field_ppm, mask, f)
        if noise_problem(field_c, mask_c, coarse_geometry) is not None:  # too small or thin a volume for blocks
            f = None
    if f is not None:
        finest = trained[0]
        progress.status(f"the grid is finer than the network's training ({finest[0]:g} mm in plane, {finest[2]:g} mm "
                        "along B0's axis at the finest): its coarse band "
                        f"from PDI on {' x '.join(f'{v:g}' for v in coarse_geometry.voxel_size)} mm blocks")
        weight_c = None if weight is None else block_mean(weight, mask, f)[0]
        coarse, _ = predict(net, field_c, mask_c, device, tile=tile, geometry=coarse_geometry, weight=weight_c,
                            reflections=reflections)
        mean = combined(mean, coarse, mask_c, mask, f)
        if info is not None:
            info["fine_grid"] = {"finest_trained_mm": list(finest), "blocks": list(f),
                                 "coarse_voxel_mm": [round(v, 4) for v in coarse_geometry.voxel_size]}
    return mean, std, inputs, one_pass


def noise_map(field_ppm: np.ndarray, mask: np.ndarray, noise_std: np.ndarray | None,
              settings: Settings) -> tuple[np.ndarray | None, int]:
    """(the noise std map a run weighs its field by, the voxels of it read off the field): the given map; without one,
    with --noisy-regions auto, the field's own noisy regions (``weighting.noisy_regions``), or None if it has none."""
    if noise_std is not None or settings.noisy_regions != "auto":
        return noise_std, 0
    found = noisy_regions(field_ppm, mask)
    return found, 0 if found is None else int((found > 1).sum())


def check_finite(field_ppm: np.ndarray, mask: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(field_ppm[np.asarray(mask) > 0])):
        raise InputError(name, "contains NaN or Inf inside the mask")


def reads_noise_level(settings: Settings) -> bool:
    """Whether a run reads the field's own noise level (``fieldstats.cone_noise``): PDI's prior channel and
    PDI-VI always; Tikhonov and MEDI for their automatic lambda or PDI's edges; TKD never."""
    if settings.method in ("tikhonov", "medi"):
        return settings.lam is None or (settings.method == "medi" and settings.medi_edges == "pdi")
    return settings.method != "tkd"


def check_noise_readable(field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, settings: Settings,
                         files: dict | None = None) -> None:
    """InputError before any work where the run needs the field's noise level and cannot read it
    (``fieldstats.noise_problem``: a mask under 27 voxels, a grid of too few slices, a constant field), naming
    the input at fault: its file from ``files`` ({'field': path, 'mask': path}), else 'field' or 'mask'."""
    if not reads_noise_level(settings):
        return
    from .fieldstats import noise_problem

    found = noise_problem(field_ppm, mask, geometry)
    if found is not None:
        fixed = not reads_noise_level(replace(settings, lam=1.0))
        source = str((files or {}).get(found[0], found[0]))
        raise InputError(source, found[1] + ("; a fixed --lambda does without it" if fixed else ""))


def vi_edges(settings: Settings) -> str:
    """Where PDI-VI's edge mask comes from: ``settings.vi_edges`` for PDI-VI1; PDI-VI2 has no TV term to mask."""
    return settings.vi_edges if settings.method == "pdi-vi1" else "magnitude"


def vi_where(settings: Settings) -> str:
    """Where PDI-VI's fine-tuned map is kept: ``settings.vi_where``, 'auto' resolved per method
    (defaults.VI_WHERE_AUTO)."""
    return defaults.VI_WHERE_AUTO[settings.method] if settings.vi_where == "auto" else settings.vi_where


def takes_pdi_edges(edges: str, magnitude_given: bool) -> bool:
    """Whether PDI-VI's edge mask comes from PDI's map: asked for ('pdi'), or 'auto' without a magnitude."""
    return edges == "pdi" or (edges == "auto" and not magnitude_given)


def vi_volume(net, field_ppm, mask, geometry: Geometry, magnitude=None, noise_std=None, device: str = "cpu",
              edges: str = "magnitude", info: dict | None = None, refills: int = 0, inputs=None, one_pass=None,
              harmonics: str = "keep"):
    """A field prepared for PDI-VI with ``net``: W from the noise std, the prior channel, and M from the
    magnitude, or with ``edges`` 'pdi' (or 'auto' and no magnitude) from the network's own map of the field:
    MEDI's rule on that map, sparing its ``solvers.PDI_EDGE_FRACTION`` N strongest gradient components (the TV
    prior then keeps the edges the network sees and smooths the rest against the field). ``info`` gets a line.
    ``refills``: the unreliable voxels' field in the network's inputs predicted that many times by PDI's map (with
    ``defaults.PDI_REFLECTIONS``), as PDI does with a given noise map (``network_io.REFILLS``); given ``inputs``
    (already refilled, from ``_pdi_map``) are taken as they are, and ``one_pass``, the network's unmirrored map of
    them (``_pdi_map``'s first pass), is the map the edges are read from instead of running the network again.
    ``harmonics`` 'ignore': the data term blind to the solid harmonics up to ``vi.BLIND_DEGREE`` (``vi.prepare``)."""
    from .inference import predict
    from .network_io import network_inputs, refilled
    from .vi import BLIND_DEGREE, prepare

    weight = data_weight(mask, noise_std)
    if inputs is not None:
        refills = 0
    else:  # once, for predict and prepare
        inputs = network_inputs(net.config.prior, field_ppm, mask, geometry, weight)
    for _ in range(refills):
        first = predict(net, field_ppm, mask, device, geometry=geometry, weight=weight,
                        reflections=defaults.PDI_REFLECTIONS, inputs=inputs)[0]
        inputs = refilled(inputs, mask, geometry, weight, first)
    source, fraction, said = magnitude, 0.9, "magnitude" if magnitude is not None else "none (TV everywhere)"
    if edges == "pdi" and magnitude is not None:
        raise InputError("--vi-edges", "'pdi' takes PDI-VI's edges from PDI's map, not from the magnitude given: give "
                                       "one of the two (--vi-edges auto or magnitude uses the magnitude)")
    if takes_pdi_edges(edges, magnitude is not None):
        source = one_pass if one_pass is not None else \
            predict(net, field_ppm, mask, device, geometry=geometry, weight=weight, inputs=inputs)[0]
        fraction, said = solvers.PDI_EDGE_FRACTION, f"PDI's map ({solvers.PDI_EDGE_FRACTION:g} N components spared)"
    if info is not None:
        info["edges"] = said
    return prepare(field_ppm, mask, geometry, net.config.stride, weight,
                   gradient_mask(mask, source, geometry.voxel_size, fraction), device, prior=net.config.prior,
                   inputs=inputs, blind_degree=BLIND_DEGREE if harmonics == "ignore" else -1)


def vi_config(settings: Settings, pdi_edges: bool = False):
    """PDI-VI settings from a reconstruction's: lambda 0 for pdi-vi2; for pdi-vi1 ``defaults.VI_LAMBDA_PDI_EDGES``
    when its edge mask comes from PDI's map (``pdi_edges``), else ``defaults.VI_LAMBDA``; the variant by default
    the decoders (``vi.DEFAULT_VARIANT``)."""
    from .vi import DEFAULT_VARIANT, VIConfig

    if settings.method not in ("pdi-vi1", "pdi-vi2"):
        raise InputError("--method", f"fine-tuning needs pdi-vi1 or pdi-vi2, not {settings.method!r}")
    default = defaults.VI_LAMBDA_PDI_EDGES if pdi_edges else defaults.VI_LAMBDA
    lam = 0.0 if settings.method == "pdi-vi2" else (settings.lam if settings.lam is not None else default)
    variant = settings.vi_variant or DEFAULT_VARIANT
    level = settings.noise_level
    estimate = dict(noise_estimate=level, sigma_estimate=level) if isinstance(level, str) else dict(noise_level=level)
    config = VIConfig(lam=lam, samples=settings.samples, iterations=settings.iterations or defaults.VI_ITERATIONS,
                      variant=variant, seed=settings.seed, estimator=settings.vi_estimator,
                      variance=settings.vi_variance, tol=settings.vi_tol, precision=settings.vi_precision, **estimate)
    config.check()
    return config


def vi_summary(config, result, kept_in_part: bool = False) -> dict:
    """The run record's account of a fine-tuning; ``kept_in_part``: its map is kept only where the field disagrees
    with PDI's, and convergence was measured on the map returned (``vi.VolumeData.keep``)."""
    measured = "the map returned (PDI's outside the region kept)" if kept_in_part else "the mean"
    return dict(lam=config.lam, samples=config.samples if config.estimator == "mc" else None,
                iterations=len(result.history), variant=config.variant,
                estimator=config.estimator, variance=config.variance,
                noise_level=result.noise_level,
                noise_level_from=("given" if config.noise_level else f"{config.noise_estimate} estimate from the field"),
                sigma_noise_level=result.sigma_noise_level,
                sigma_noise_level_from=("given" if config.noise_level else f"{config.sigma_estimate} estimate from the field"),
                stopped=(f"converged: {measured} moved less than {config.tol:g} over 10 iterations"
                         if len(result.history) < config.iterations else "iteration limit"),
                finetune_seconds=round(result.seconds, 2), precision=result.precision,
                final_terms={k: result.history[-1][k] for k in ("loss", "entropy", "fidelity", "tv")})


def tuned_text(summary: dict) -> str:
    """One line for the user on how a fine-tuning ended (from ``vi_summary``'s record)."""
    return (f"fine-tuned for {summary['iterations']} iterations in {summary['finetune_seconds']:.0f} s "
            f"({summary['stopped']})")


def set_sigma(config) -> tuple[str, bool]:
    """What sigma the weights adapted on a set give on unseen fields (recorded in their manifest), and
    whether it is still the base network's calibrated one."""
    if config.variance == "network":
        return "tuned log-variance decoder (the paper's; it collapses towards its lower bound)", False
    if config.variant == "full":
        return "base log-variance decoder reading a tuned encoder (not calibrated)", False
    return "base network's (encoder and log-variance decoder frozen)", True


def finetune_files(field_paths, mask_paths, out, settings: Settings, noise_paths=None, magnitude_paths=None,
                   validation: tuple | None = None, progress: Progress | None = None, **load_kwargs) -> dict:
    """PDI-VI on a set of fields (the paper's use): fine-tune a copy of the weights on them, cycling
    one field per iteration, and write the adapted weights (safetensors + manifest) to ``out``.

    ``validation`` = (field, mask) enables early stopping on that field's loss. The input weights are
    never modified, and ``out`` may not be any input file. Returns the manifest written.
    """
    from . import vi
    from .inference import pick_device
    from .weights import DEFAULT_WEIGHTS, load_model, save_weights

    settings.check()
    config = vi_config(settings, takes_pdi_edges(vi_edges(settings), bool(magnitude_paths)))
    progress = progress or Progress("none")
    field_paths = [Path(p) for p in field_paths]
    if not field_paths:
        raise InputError("FIELD", "no field to fine-tune on")
    optional = {"--masks": mask_paths, "--noise-std": noise_paths, "--magnitudes": magnitude_paths}
    for flag, paths in optional.items():
        if paths and len(paths) != len(field_paths):
            raise InputError(flag, f"{len(paths)} files for {len(field_paths)} fields; give one per field, in order")
    if not mask_paths:
        raise InputError("--masks", "a brain mask is required for each field")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(str(out), "the adapted weights must be a .safetensors file")
    weights = Path(settings.weights) if settings.weights else DEFAULT_WEIGHTS
    protect = [weights, weights.with_suffix(".json")] + field_paths + [Path(p) for p in mask_paths]
    protect += [Path(p) for p in (noise_paths or []) + (magnitude_paths or [])]
    protect += [Path(p) for p in (validation or ())]
    for target in (out, out.with_suffix(".json")):
        if any(target.resolve() == q.resolve() for q in protect):
            raise InputError(str(target), "output would overwrite an input file (the weights or a field); choose another --out")
    device = pick_device(settings.device)
    net, manifest = load_model(settings.weights, device)

    def prepared(i: int, field_path, mask_path, noise_path=None, magnitude_path=None):
        inp = load_inputs(field_path, mask_path, magnitude_path, noise_path, **load_kwargs)
        check_noise_readable(inp.field_ppm, inp.mask, inp.geometry, settings, {"field": field_path, "mask": mask_path})
        progress.status(f"field {i}: {inp.field.data.shape}, voxel {inp.geometry.voxel_size} mm")
        noise, found = noise_map(inp.field_ppm, inp.mask, inp.noise_std, settings)
        if found:
            progress.status(f"field {i}: {found} voxels whose field is noise are down-weighted")
        taken = {"field": str(field_path)}  # the trend, if asked, fitted beside the input weights' PDI map
        field = as_read(inp.field_ppm, inp.mask, inp.geometry, settings, noise, progress, taken)
        if i:
            prepared_fields.append(taken)
        order, geometry, arrays = network_frame(inp.geometry, field, inp.mask, inp.magnitude, noise)
        if order != (0, 1, 2):  # as reconstruct's network reads it (_pdi_relabelled)
            progress.status(f"field {i}: B0 lies nearest voxel axis {order[2]}: tuned on with that axis last")
        field_r, mask_r, magnitude_r, noise_r = arrays
        return vi_volume(net, field_r, mask_r, geometry, magnitude_r, noise_r, device, vi_edges(settings),
                         harmonics=settings.vi_harmonics)

    prepared_fields: list[dict] = []  # what was taken off each field before fine-tuning
    volumes = [prepared(i + 1, f, m, (noise_paths or [None] * len(field_paths))[i],
                        (magnitude_paths or [None] * len(field_paths))[i])
               for i, (f, m) in enumerate(zip(field_paths, mask_paths))]
    held_out = prepared(0, *validation) if validation else None
    progress.status(f"fine-tuning PDI ({settings.method}, {config.variant}) on {len(volumes)} field(s), {device}")
    sigma, calibrated = set_sigma(config)
    if not calibrated and config.variance == "voxel":
        progress.status(f"warning: the adapted weights' sigma will be the {sigma}")
    torch.manual_seed(settings.seed)
    result = vi.finetune(net, volumes, config, progress.task("vi", may_stop_early=config.tol > 0), validation=held_out)
    info = {"base_weights_sha256": manifest["sha256"], "base_weights": str(weights),
            "finetuned_on": [str(p) for p in field_paths], "validation": [str(p) for p in validation or ()],
            "method": settings.method, **vi_summary(config, result), "sigma": sigma, "pdiqsm_version": __version__,
            "edges": vi_edges(settings), "field_mean": settings.field_mean, "field_trend": settings.field_trend,
            "vi_harmonics": settings.vi_harmonics, "fields_prepared": prepared_fields}
    progress.status(tuned_text(info))
    if held_out is not None:
        info["best_validation_loss"] = min(h["validation"] for h in result.history if "validation" in h)
    save_weights(result.net, out, info)
    progress.status(f"wrote {out} and {out.with_suffix('.json')}")
    return json.loads(out.with_suffix(".json").read_text())


def output_paths(out_dir: Path, field_path, naming: str = "pdiqsm", method: str = "medi") -> dict[str, Path]:
    """Where a run writes, named by the method so that runs of different methods never mix:
    ``<stem>_<method>_chi-mean/_chi-std.nii.gz`` and ``<stem>_<method>_run.json``, or BIDS-style names
    (``desc-<method>`` entity; see ``bids.bids_names``)."""
    if naming == "bids":
        from .bids import bids_names

        return {k: out_dir / v for k, v in bids_names(field_path, method).items()}
    if naming != "pdiqsm":
        raise InputError("--naming", f"unknown naming {naming!r}; expected pdiqsm or bids")
    stem = f"{nifti_stem(Path(field_path))}_{method}"
    return {"mean": out_dir / f"{stem}_chi-mean.nii.gz", "std": out_dir / f"{stem}_chi-std.nii.gz",
            "regions": out_dir / f"{stem}_regions.tsv", "record": out_dir / f"{stem}_run.json"}


def resolve_geometry(field: Volume, params: Params | None, b0_dir=None) -> Geometry:
    """Geometry from the NIfTI affine; params.json or an explicit B0 direction override it."""
    direction = b0_dir if b0_dir is not None else (params.b0_dir if params and params.b0_dir else None)
    geo = geometry_from_affine(field.affine, normalise_b0_dir(direction) if direction is not None else None)
    if params and params.voxel_size and not np.allclose(params.voxel_size, geo.voxel_size, rtol=1e-3):
        raise InputError(params.source, f"voxel_size {' x '.join(f'{v:g}' for v in params.voxel_size)} mm differs from "
                                        f"the NIfTI header's {' x '.join(f'{v:.4g}' for v in geo.voxel_size)} mm")
    return geo


@dataclass
class Inputs:
    """One field with everything read beside it, checked and converted to ppm."""

    field: Volume
    field_ppm: np.ndarray
    mask: np.ndarray
    geometry: Geometry
    magnitude: np.ndarray | None
    noise_std: np.ndarray | None
    b0: float | None
    te: float | None
    nonfinite_outside_mask: dict = field(default_factory=dict)  # role: NaN/Inf voxels outside the mask, set to 0


def load_inputs(field_path, mask_path, magnitude_path=None, noise_path=None, units: str = "ppm",
                b0: float | None = None, te: float | None = None, b0_dir=None, params_path=None,
                volume_index: int | None = None) -> Inputs:
    """Read a field and its mask (and magnitude, noise std, params.json), check grids, convert units."""
    field = load_volume(field_path, "field", volume_index, finite=False)
    mask = load_mask(mask_path, field)
    ignored = {"field": finite_in_mask(field, mask, "field")}
    params = read_params(params_path) if params_path else None
    if params:
        b0 = b0 if b0 is not None else params.b0
        te = te if te is not None else params.te
    geometry = resolve_geometry(field, params, b0_dir)
    field_ppm = to_ppm(field.data, units, b0, te)
    for note in field_warnings(field.data[mask], ppm_per_unit(units, b0, te), units, str(field_path)):
        warn(note)
    extras = {}
    for role, path in (("magnitude", magnitude_path), ("noise std", noise_path)):
        if path is not None:
            vol = load_volume(path, role, finite=False)
            check_same_grid(field, vol, role)
            ignored[role] = finite_in_mask(vol, mask, role)
            if role == "noise std":
                check_noise_std(vol.data[mask], str(path))
            for note in magnitude_warnings(vol.data[mask], str(path)) if role == "magnitude" else ():
                warn(note)
            extras[role] = vol.data
    return Inputs(field, field_ppm, mask, geometry, extras.get("magnitude"), extras.get("noise std"), b0, te,
                  {role: n for role, n in ignored.items() if n})


def reconstruct_files(field_path, mask_path, out_dir, settings: Settings, magnitude_path=None, noise_path=None,
                      units: str = "ppm", b0: float | None = None, te: float | None = None, b0_dir=None,
                      params_path=None, volume_index: int | None = None, progress: Progress | None = None,
                      naming: str = "pdiqsm", overwrite: bool = False, labels_path=None, names_path=None,
                      reference: str = "whole-brain") -> dict:
    """Read, check, convert, reconstruct and write the output set (``outputs.OutputSet``: all or nothing;
    existing outputs are replaced only with ``overwrite``); returns the run record (also written as JSON)."""
    settings.check()
    progress = progress or Progress("none")
    t0 = time.perf_counter()
    inputs_ = load_inputs(field_path, mask_path, magnitude_path, noise_path, units, b0, te, b0_dir, params_path,
                          volume_index)
    field, field_ppm, mask, geometry = inputs_.field, inputs_.field_ppm, inputs_.mask, inputs_.geometry
    b0, te = inputs_.b0, inputs_.te
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, field.path, naming, settings.method)
    inputs = [field_path, mask_path, magnitude_path, noise_path, params_path]
    labels = None
    if labels_path is not None:  # read and checked before anything is created
        from . import regions

        labels, labels_note = regions.load_labels(labels_path, field)
        names = regions.read_names(names_path) if names_path else regions.default_names(labels_path)
        regions.resolve_reference(reference, names, regions.present_labels(labels, mask, str(labels_path)))
    outputs = OutputSet(paths, protect=inputs, overwrite=overwrite)
    outputs.check()  # before the work: a run that cannot publish fails in a second, not after an hour
    progress.status(f"{settings.method}: field {field.data.shape}, voxel {geometry.voxel_size} mm, B0 {geometry.b0_dir}")
    try:
        result = reconstruct(field_ppm, mask, geometry, settings, inputs_.magnitude, inputs_.noise_std, progress)
        stats = None
        if labels is not None:
            model = regions.error_model_for(result.std is not None, settings.weights,
                                            result.info.get("weights_sha256"), method=settings.method)
            stats = regions.region_stats(result.mean, mask, labels, geometry.voxel_size, result.std, names,
                                         reference, model)
            if labels_note:
                stats["notes"].insert(0, labels_note)
    except BaseException as exc:
        outputs.abandon()  # no empty output folder left behind
        files = {"field": field_path, "mask": mask_path, "magnitude": magnitude_path, "noise std": noise_path}
        files = {role: path for role, path in files.items() if path is not None}  # the library names inputs by role
        if isinstance(exc, InputError) and exc.source in files:
            raise InputError(str(files[exc.source]), exc.problem) from None
        raise
    with outputs:
        written = [outputs.volume("mean", result.mean, field, f"PDIQSM {settings.method} chi ppm")]
        if result.std is not None:
            written.append(outputs.volume("std", result.std, field, f"PDIQSM {settings.method} chi std ppm"))
        if stats is not None:
            from .regions import table_tsv

            written.append(outputs.text("regions", table_tsv(stats)))
        record = {
            "pdiqsm_version": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "inputs": {k: (str(v) if v is not None else None) for k, v in
                       zip(("field", "mask", "magnitude", "noise_std", "params"), inputs)},
            "units": units, "b0_tesla": b0, "te_seconds": te,
            **({"nonfinite_outside_mask": inputs_.nonfinite_outside_mask} if inputs_.nonfinite_outside_mask else {}),
            "geometry": asdict(geometry), "settings": settings.applicable(), "result": result.info,
            "outputs": [str(p) for p in written], "seconds_total": round(time.perf_counter() - t0, 3),
        }
        if stats is not None:
            record["regions"] = {"labels": str(labels_path), "names": str(names_path) if names_path else None,
                                 **{k: v for k, v in stats.items() if k != "rows"}}
        if naming == "bids":
            from .bids import sidecar

            outputs.json("record", sidecar(record))
        else:
            outputs.json("record", record)
        outputs.publish()
    progress.status(f"wrote {', '.join(str(p) for p in written)}")
    return record


def recorded_settings(record_path: Path) -> dict | None:
    """The settings an earlier run recorded (run record or BIDS sidecar), without unset ones; None if unreadable."""
    try:
        record = json.loads(Path(record_path).read_text())
    except (OSError, ValueError):
        return None
    settings = record.get("settings", record.get("MethodSettings"))
    return {k: v for k, v in settings.items() if v is not None} if isinstance(settings, dict) else None


def reconstruct_tree(root, out_dir, settings: Settings, field_pattern: str = "*_localfield.nii*",
                     mask_suffix: str = "mask", naming: str = "bids", progress: Progress | None = None,
                     overwrite: bool = False, labels_suffix: str | None = None, **kwargs) -> list[dict]:
    """Every subject under ``root`` (see ``bids.find_subjects``) into the same folders under ``out_dir``.

    Returns one entry per subject, with ``status`` done, skipped or failed and a ``reason``. A subject
    is skipped when its outputs for this method exist (the record, published last, marks a whole set):
    as done when they were made with these settings, else with a note to pass ``overwrite``. A subject
    that fails (no mask, unreadable, bad values) does not stop the others and leaves nothing behind; an
    interrupt stops the run, keeps the subjects finished before it, and a rerun resumes after them.

    ``labels_suffix``: each subject's region labels are ``<name>_<suffix>.nii[.gz]`` beside its field; each
    gets its region table, and ``<out_dir>/group_desc-<method>Regions_stats.tsv`` holds every subject's
    region means (a column per subject)."""
    from .bids import find_subjects

    progress = progress or Progress("none")
    settings.check()
    subjects, missing = find_subjects(Path(root), field_pattern, mask_suffix)
    entries = [{"field": str(f), "status": "failed", "reason": f"no mask (*_{mask_suffix}.nii[.gz]) beside it"}
               for f in missing]
    if not subjects and not missing:
        raise InputError(str(root), f"no field matching {field_pattern!r} below this folder")
    wanted = {k: v for k, v in settings.applicable().items() if v is not None}
    task = progress.task("subjects")
    for i, sub in enumerate(subjects, 1):
        target = Path(out_dir) / sub.relative
        paths = output_paths(target, sub.field, naming, settings.method)
        record_path = paths["record"]
        entry = {"field": str(sub.field), "regions": str(paths["regions"])}
        if record_path.exists() and not overwrite:
            before = recorded_settings(record_path)
            if before == wanted:
                entry.update(status="skipped", reason=f"done ({settings.method}, same settings: {record_path.name})")
            else:
                differ = sorted(k for k in set(wanted) | set(before or {}) if (before or {}).get(k) != wanted.get(k))
                entry.update(status="skipped", reason=f"{record_path.name} exists with other {settings.method} settings "
                                                      f"({', '.join(differ) or 'unreadable record'}); pass --overwrite to redo")
            progress.status(f"skipping {sub.field}: {entry['reason']}")
        else:
            try:
                labels = _subject_labels(sub.field, labels_suffix) if labels_suffix else None
                record = reconstruct_files(sub.field, sub.mask, target, settings, params_path=sub.params,
                                           progress=progress, naming=naming, overwrite=overwrite,
                                           labels_path=labels, **kwargs)
                entry.update(status="done", outputs=record["outputs"])
            except (InputError, ValueError, RuntimeError, OSError) as exc:
                entry.update(status="failed", reason=str(exc))
                progress.status(f"failed {sub.field}: {exc}")
        entries.append(entry)
        task(i, len(subjects))
    if labels_suffix:
        _group_table(entries, Path(out_dir), settings.method, progress)
    return entries


def _subject_labels(field: Path, suffix: str) -> Path:
    stem = nifti_stem(field)
    base = stem.rsplit("_", 1)[0] if "_" in stem else stem
    for ext in (".nii.gz", ".nii"):
        candidate = field.with_name(f"{base}_{suffix}{ext}")
        if candidate.exists():
            return candidate
    raise InputError(str(field), f"no labels (*_{suffix}.nii[.gz]) beside it")


def _group_table(entries: list[dict], out_dir: Path, method: str, progress: Progress) -> Path | None:
    """Every subject's region means (relative to its reference), one column per subject, from their tables."""
    from .bids import desc_label, entities_prefix
    from .io import write_text_atomic
    from .regions import cohort_tsv, read_table_tsv

    tables = {}
    for e in entries:
        if e["status"] != "failed" and Path(e["regions"]).exists():
            tables[entities_prefix(e["field"])] = {"rows": read_table_tsv(e["regions"])}
    if not tables:
        return None
    path = write_text_atomic(out_dir / f"group_desc-{desc_label(method)}Regions_stats.tsv", cohort_tsv(tables))
    progress.status(f"wrote {path}")
    return path


def tree_summary(entries: list[dict]) -> str:
    """'3 done, 1 skipped, 1 failed' for a folder run."""
    counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "skipped", "failed")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())
