"""Weights for the data and prior terms, in MEDI's conventions.

- data weight W = mask / N_std, normalised to mean 1 inside the mask (W = mask without a noise map);
- gradient mask M: 1 where the magnitude image has no edge, 0 on edges, so that TV does not smooth
  across anatomical boundaries (M = mask without a magnitude image).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .gradient import grad


def check_noise_std(inside: np.ndarray, source: str) -> None:
    """Refuse a noise std map (its values inside the mask) that is not a finite number > 0 at every voxel: the
    data weight is mask / N_std."""
    bad = int(np.count_nonzero(~(np.isfinite(inside) & (np.asarray(inside) > 0))))
    if bad:
        raise InputError(source, f"noise standard deviation must be > 0 inside the mask (positive and finite: the data "
                                 f"weight is mask / N_std); {bad} voxels are not")


def data_weight(mask: np.ndarray, noise_std: np.ndarray | None = None, source: str = "noise std") -> np.ndarray:
    """W = mask / N_std, normalised to mean 1 inside the mask; float32."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise InputError("mask", "the mask is empty (no voxel > 0)")
    if noise_std is None:
        return m.astype(np.float32)
    n = np.asarray(noise_std, dtype=np.float64)
    if n.shape != m.shape:
        raise InputError(source, f"shape {n.shape} differs from the mask's {m.shape}")
    inside = n[m]
    check_noise_std(inside, source)
    w = np.zeros(m.shape, np.float64)
    w[m] = 1.0 / inside
    w /= w[m].mean()
    return w.astype(np.float32)


def inverse_variance(mask: np.ndarray, noise_std: np.ndarray | None) -> np.ndarray | None:
    """W^2 at the mask's voxels (in ``mask``'s order; ``data_weight``): a least-squares weight; None without a map."""
    return None if noise_std is None else data_weight(mask, noise_std).astype(np.float64)[np.asarray(mask) > 0] ** 2


def without_mean(field_ppm: np.ndarray, mask: np.ndarray,
                 noise_std: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(the field less its mean in ``mask``, zero outside; that mean, ppm), the mean weighted by the inverse noise
    variance where a noise map is given (a bleed's noise does not set it). A constant is harmonic: a field's mean
    in the brain cannot be told from background (an unwrapping's 2 pi n, a removal that left it), and no method's
    map should follow it. Measured (seeds 45000-45003, 1 mm iso, session 38): 0.005 ppm added cost PDI 2.6 points
    of demeaned NRMSE and Tikhonov 5.8; removed, nothing; removing it from fields without one changed PDI by 0.00
    and Tikhonov by 0.08 on average (benchmarks/results/field_offset.md on held-out brains)."""
    m = np.asarray(mask) > 0
    f = np.asarray(field_ppm, np.float64)
    offset = float(np.average(f[m], weights=inverse_variance(m, noise_std)))
    return np.where(m, f - offset, 0.0).astype(np.float32), offset


def solid_harmonics(x, y, z, degree: int = 2) -> list:
    """The real solid harmonics of degree 0 to ``degree`` (at most 2) at coordinates x, y, z (arrays of one shape):
    1; x, y, z; xy, yz, zx, x^2 - y^2, (2 z^2 - x^2 - y^2) / sqrt 3. Each has zero Laplacian: to low order, the
    fields that sources outside a region make inside it."""
    if not 0 <= degree <= 2:
        raise ValueError(f"solid harmonics of degree 0 to 2, not {degree}")
    terms = [np.ones_like(x)]
    if degree >= 1:
        terms += [x, y, z]
    if degree >= 2:
        terms += [x * y, y * z, z * x, x**2 - y**2, (2 * z**2 - x**2 - y**2) / np.sqrt(3.0)]
    return terms


def harmonic_basis(mask: np.ndarray, voxel_size, degree: int = 2, weight: np.ndarray | None = None) -> np.ndarray:
    """(N, k) the solid harmonics of degree up to ``degree`` at the mask's N voxels (in ``mask``'s order), in units of
    100 mm about the mask's centre (float64; k = 1, 4 or 9); ``weight`` (the volume's W): each row times W there."""
    m = np.asarray(mask) > 0
    idx = np.argwhere(m)
    r = (idx - idx.mean(0)) * np.asarray(voxel_size, np.float64) / 100.0
    basis = np.column_stack(solid_harmonics(*r.T, degree=degree))
    if weight is not None:
        basis *= np.asarray(weight, np.float64)[m][:, None]
    return basis


def without_harmonics(residual: np.ndarray, mask: np.ndarray, voxel_size, weight: np.ndarray | None = None,
                      degree: int = 2) -> np.ndarray:
    """A weighted residual W (D chi - b) less its least-squares part in the span of W h, h the solid harmonics up to
    ``degree`` (``harmonic_basis``): what a field made by sources outside the mask would leave in it (zero outside
    the mask; float64). ``weight``: W (None: 1 in the mask)."""
    m = np.asarray(mask) > 0
    basis = harmonic_basis(m, voxel_size, degree, weight)
    r = np.asarray(residual, np.float64)[m]
    out = np.zeros(m.shape)
    out[m] = r - basis @ np.linalg.solve(basis.T @ basis, basis.T @ r)  # normal equations: no copy of the basis
    return out


def edge_threshold(gradient_magnitude: np.ndarray, n_mask: int, fraction: float = 0.9) -> float:
    """Threshold t with #(components > t) = fraction * n_mask (MEDI's default rule, fraction 0.9)."""
    values = np.sort(gradient_magnitude.ravel())
    count = int(round(fraction * n_mask))
    count = min(max(count, 0), values.size)
    if count == 0:
        return float(values[-1])
    return float(values[values.size - count - 1]) if count < values.size else float(values[0]) - 1.0


def gradient_mask(mask: np.ndarray, magnitude: np.ndarray | None, voxel_size, fraction: float = 0.9) -> np.ndarray:
    """M, shape (3, X, Y, Z): 1 where |grad magnitude| <= threshold inside the mask, else 0."""
    m = np.asarray(mask) > 0
    if magnitude is None:
        return np.broadcast_to(m, (3,) + m.shape).astype(np.float32)
    mag = np.asarray(magnitude, dtype=np.float64)
    if mag.shape != m.shape:
        raise InputError("magnitude", f"shape {mag.shape} differs from the mask's {m.shape}")
    if not np.all(np.isfinite(mag[m])):
        raise InputError("magnitude", "contains NaN or Inf inside the mask")
    g = np.abs(grad(torch.from_numpy(mag * m), voxel_size).numpy())
    t = edge_threshold(g, int(m.sum()), fraction)
    return ((g <= t) & m[None]).astype(np.float32)


# Where no noise map is given: regions whose field is noise, read off the field itself (``noisy_regions``).
NOISY_WINDOW = 5  # voxels: the window of the local medians
NOISY_RATIO = 10.0  # local roughness over the brain's: the factor at which network_io.unreliable_voxels (W < 0.1) acts
NOISY_COHERENCE = 0.2  # and at least this share of the field's local spread: noise, not a steep dipole field
NOISY_FLOOR_PPM = 2e-4  # the brain's level is taken at least this: no measured field is quieter (issue 12: 7e-4 at
# 3 T), and a noiseless simulated field's voxel-scale texture around a sharp source is not noise
NOISY_RIM_LEVEL = 30.0  # a rim voxel is noise where its field departs from the trusted field's straight continuation
NOISY_RIM_CURVATURE = 4.0  # by over this many times the brain's level and this many times that field's own bend
NOISY_RIM_FIRM = 3.0  # a rim voxel found clean lends its field's bend to the voxels inside it where its own departure
# was at most this many times the level (a noisy voxel that passed lends none: no cascade of excused noise)


def noisy_regions(field: np.ndarray, mask: np.ndarray, erode: int = 1, rim: bool = True) -> np.ndarray | None:
    """A relative noise std map (1 in the brain) for a field given without one, or None where nothing is noise.

    An acute bleed (or any signal void) leaves a local field that is noise, tens to hundreds of times the brain's;
    fed as data, it ruins PDI (the shared ICH case without its noise map: 380 % demeaned NRMSE) and MEDI. Found here
    from the field alone: the roughness r, the separable second difference (1, -2, 1) along the three axes (white
    noise of std s gives std sqrt(216) s; a field locally polynomial of degree < 2 along any axis gives 0), as a
    robust local std (median of |r| / 0.6745 / sqrt(216) over a ``NOISY_WINDOW``^3 window, the mask's voxels whose
    stencil lies inside it); the brain's level s0 is its median over those voxels (at least ``NOISY_FLOOR_PPM``).
    A voxel is noise where its local roughness is over ``NOISY_RATIO`` s0 and over ``NOISY_COHERENCE`` times the
    field's local spread there (median absolute deviation from the local median): white noise has a roughness equal to
    its spread, a dipole field, even the steep one just outside a bleed, a few hundredths of it, so a field with strong
    sources and noise marks nothing. (A noiseless simulated field of a voxelised 1 ppm sphere does: the staircase's
    field has a voxel-scale texture that looks like noise; partial volume, a 0.75-voxel blur, or any noise removes it.)
    The region is then eroded by ``erode`` voxels (default one): the stencil and the window carry the noise one to two
    voxels beyond it, into the field just outside a bleed that tells most about the bleed (chosen on realistic bleed
    brains of seeds 81000+, benchmarks/results/noisy_regions.md). The noisy voxels get their roughness over s0 as their
    relative noise (so W = 1 / that, normalised, is under a tenth of the brain's there), every other voxel 1.

    Every region has its rim checked voxel by voxel (``rim_check``, with ``rim``): the window and the erosion leave a
    rim of voxels unmarked, and where the noise is hundreds of times the brain's (a void's phase is uniform: about 1.8
    SNR times the brain's noise, 35-180 at an SNR of 20-100; the shared ICH case's map 800) a few dozen of them ruin PDI
    and MEDI (a realistic bleed brain at 200 times: PDI 80 % demeaned NRMSE, 43 with the check, 40 with the true map;
    MEDI 88, 35, 29). Until session 28 the check was made only around a region over 150 times the brain's level: on
    bleeds voxelised all-or-nothing, whose field outside carried a staircase texture, it marked that field and cost
    PDI 3-7 points at 20-60 times. On bleeds with partial volume (``simulation.add_bleed``) checking every region is
    level for PDI and better for MEDI (calibration brains 81000-81005 at 20 and 60 times: PDI 33.9 -> 33.6 %, MEDI
    33.0 -> 29.7; MEDI better on 10 of the 12, PDI on 5 and worse on 5). The check's levels were chosen on bleed
    brains 81000, 81002 and 81004 at 20, 60 and 200 times, its firm level (``NOISY_RIM_FIRM``) on the same at 200 and
    400 times and on 81001, 81003 and 81005 at 60 and 200 (benchmarks/results/noisy_regions_loud.md), then on
    all-or-nothing bleeds; re-checked on the partial-volume ones (81000-81005 at 20, 60, 200: levels 20-45 and
    curvatures 3-5 trade PDI against MEDI by under a point, none better for both)."""
    m = np.asarray(mask) > 0
    cube = np.ones((3, 3, 3), bool)
    inner = ndimage.binary_erosion(m, cube)
    if inner.sum() < 1000:
        return None  # too small a brain to tell a region from the rest
    f = np.where(m, np.asarray(field, np.float64), 0.0)
    r = f
    for axis in range(3):
        r = ndimage.correlate1d(r, [1.0, -2.0, 1.0], axis=axis, mode="constant")
    r = np.abs(r) / (0.6745 * np.sqrt(216.0))
    s0 = max(float(np.median(r[inner])), NOISY_FLOOR_PPM)
    r = np.where(inner, r, s0)
    # The medians are slow on a whole brain (2.7 s at 160^3 on one core); a window whose median is over NOISY_RATIO s0
    # has half its values over that, so its mean is over half of it: the medians run only in a box around each group of
    # such windows (a voxel's result reads its own group's voxels and those within two nested medians and the erosion).
    screen = m & (ndimage.uniform_filter(r, size=NOISY_WINDOW, mode="nearest") > 0.5 * NOISY_RATIO * s0)
    out = np.ones(m.shape, np.float32)
    groups, _ = ndimage.label(screen, np.ones((3, 3, 3), bool))
    reach = 2 * NOISY_WINDOW + erode
    for label, found in enumerate(ndimage.find_objects(groups), start=1):
        box = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in found)
        rough = ndimage.median_filter(r[box], size=NOISY_WINDOW, mode="nearest")
        candidates = (groups[box] == label) & (rough > NOISY_RATIO * s0)
        if not candidates.any():
            continue
        fb = f[box]
        spread = ndimage.median_filter(np.abs(fb - ndimage.median_filter(fb, size=NOISY_WINDOW, mode="nearest")),
                                       size=NOISY_WINDOW, mode="nearest") / 0.6745
        region = candidates & (rough > NOISY_COHERENCE * spread)
        noisy = ndimage.binary_erosion(region, cube, iterations=erode) if erode > 0 else region
        ratio = rough / s0
        if rim and noisy.any():
            core = noisy
            noisy = rim_check(fb, m[box] & (out[box] <= 1), region, core, NOISY_RIM_LEVEL * s0, NOISY_RIM_CURVATURE)
            # a rim voxel's field departs by over NOISY_RIM_LEVEL s0: its relative noise is at least that (its local
            # roughness may be under NOISY_RATIO), so W there is under a tenth of the brain's, as in the core
            ratio = np.where(core, ratio, np.maximum(ratio, NOISY_RIM_LEVEL))
        out[box][noisy] = ratio[noisy]
    return out if (out > 1).any() else None


def rim_check(field: np.ndarray, mask: np.ndarray, region: np.ndarray, core: np.ndarray, threshold: float,
              curvature: float, firm_level: float = NOISY_RIM_FIRM) -> np.ndarray:
    """``core`` and the voxels of ``region``'s rim (its one-voxel dilation in ``mask``, less the core) whose field is
    not the continuation of the trusted field beyond it: along each axis direction whose next three voxels are trusted
    (in the mask, outside the rim and the core), the voxel's departure from the straight line through the next two,
    |f(v) - 2 f(v+1) + f(v+2)|, is taken at the direction where it is least; the voxel is noise where that is over
    ``threshold`` (ppm) and over ``curvature`` times the same second difference one voxel further out (a steep field's
    own bend, read only where those three voxels are firm: trusted from the start, or found clean with a departure of
    at most ``firm_level`` times ``threshold``; else no bend is allowed). Decided from the outside in: a voxel found
    clean is trusted by the voxels inside it; one with no straight line of trusted voxels out counts as noise."""
    f = np.asarray(field, np.float64)
    rim = ndimage.binary_dilation(region, np.ones((3, 3, 3), bool)) & mask & ~core
    clear = mask & ~rim & ~core
    trusted = clear.copy()
    firm = clear.copy()  # the voxels that may lend a bend: clear, or found clean by a small departure of their own
    noisy = core.copy()
    pad = 3
    fp = np.pad(f, pad)
    inner = tuple(slice(pad, pad + n) for n in f.shape)

    def ahead(a: np.ndarray, axis: int, k: int) -> np.ndarray:  # a at v + k along axis (k may be negative)
        sl = list(inner)
        sl[axis] = slice(pad + k, pad + k + f.shape[axis])
        return a[tuple(sl)]

    def line(a: np.ndarray, axis: int, step: int) -> np.ndarray:  # the next three voxels along the direction in a
        return ahead(a, axis, step) & ahead(a, axis, 2 * step) & ahead(a, axis, 3 * step)

    # per axis direction, what does not change from round to round: the departure from the straight line through
    # the next two voxels, and the bend one voxel further out. The bend is lent only by firm voxels: a noisy voxel
    # that passed, its draw small or excused by a bend, must not lend the voxels inside it a bend that excuses their
    # noise (with every passed voxel lending, calibration brain 81000 at 200 times: PDI 50.7 -> 64.7 % by that cascade)
    lines = []
    for axis in range(3):
        for step in (1, -1):
            f1, f2, f3 = (ahead(fp, axis, k * step) for k in (1, 2, 3))
            lines.append((axis, step, np.abs(f - 2 * f1 + f2), np.abs(f1 - 2 * f2 + f3)))
    while rim.any():
        tp, fpad = np.pad(trusted, pad), np.pad(firm, pad)
        least = np.full(f.shape, np.inf)
        bend = np.zeros(f.shape)
        seen = np.zeros(f.shape, bool)
        for axis, step, departure, line_bend in lines:
            ok = rim & line(tp, axis, step)
            take = ok & (departure < least)
            least[take] = departure[take]
            bend[take] = np.where(line(fpad, axis, step)[take], line_bend[take], 0.0)
            seen |= ok
        if not seen.any():
            break
        bad = seen & (least > threshold) & (least > curvature * bend)
        trusted |= seen & ~bad
        firm |= seen & ~bad & (least <= firm_level * threshold)
        noisy |= bad
        rim &= ~seen
    return noisy | rim


# Where PDI-VI's fine-tuned map replaces PDI's (``discrepant_region``; pipeline.Settings.vi_where 'discrepant').
DISCREPANCY_RATIO = 2.0  # local RMS of PDI's weighted residual over its median deep in the brain
DISCREPANCY_DEPTH_MM = 10.0  # only this deep: nearer the edge a healthy field's residue is as large (issue 12)
DISCREPANCY_WINDOW_MM = 3.0  # Gaussian sigma of the local RMS
DISCREPANCY_BLEND_MM = 2.0  # Gaussian sigma of the blend's border


# PDI-VI1's 'gated' rule (its default): keep the fine-tuned map only where the field disagrees with PDI's when PDI's
# weighted residual RMS lies within this band of the field's cone noise estimate (``residual_over_cone``: PDI's map
# explains the field down to what no map explains), everywhere otherwise.
GATE_BAND = (0.78, 1.2)


def gated(ratio: float) -> str:
    """Where the 'gated' rule keeps PDI-VI's fine-tuned map for a ``residual_over_cone`` ratio: 'discrepant' within
    ``GATE_BAND``, 'everywhere' outside it."""
    return "discrepant" if GATE_BAND[0] <= ratio <= GATE_BAND[1] else "everywhere"


def weighted_residual(field: np.ndarray, mask: np.ndarray, geometry, weight: np.ndarray,
                      mean: np.ndarray) -> np.ndarray:
    """r = W (D mean - b) in the mask (0 outside), float64; the dipole convolution with 1.5x padding."""
    from .physics import DipoleOperator

    inside = np.asarray(mask) > 0
    op = DipoleOperator(inside.shape, geometry, 1.5, torch.float64)
    chi = torch.from_numpy(np.where(inside, mean, 0.0).astype(np.float64))
    return np.where(inside, np.asarray(weight, np.float64) * (op.forward(chi).numpy() - field), 0.0)


def residual_over_cone(field: np.ndarray, mask: np.ndarray, geometry, weight: np.ndarray,
                       residual: np.ndarray) -> float:
    """RMS of PDI's weighted residual in the mask over the cone noise estimate of the weighted field
    (``fieldstats.cone_noise``: the level of what no map explains, read off the magic-angle cone).

    Measured (benchmarks/results/vi_where.md): 0.77-1.10 on healthy realistic brains, where the bundled model is in its
    training distribution and its residual sits at the field's unexplainable level, so fine-tuning everywhere fits the
    non-dipolar part (it harmed 11 of 16); 0.56-0.73 on 9 of the 12 bleeds where fine-tuning everywhere helped (a
    bleed's truncated field inflates the cone; the other three 0.80-0.88, the one it harmed 0.91). A model out of its
    distribution (the first, procedural-trained one, on realistic brains, where fine-tuning everywhere gained 14-48
    points) read 0.57-0.70 on five brains, whose maps fit the field's non-dipolar part too, and 1.44 on one, whose map
    leaves explainable field: both outside ``GATE_BAND``, so ``gated`` fine-tunes those everywhere."""
    from .fieldstats import cone_noise

    inside = np.asarray(mask) > 0
    level = cone_noise(np.asarray(weight, np.float64) * field, inside, geometry)
    return float(np.sqrt((residual[inside] ** 2).mean()) / max(level, 1e-12))


def gate_ratios(field: np.ndarray, mask: np.ndarray, geometry, weight: np.ndarray,
                residual: np.ndarray) -> tuple[float, float]:
    """(``residual_over_cone``, the same for the residual less its low-order harmonic part, ``without_harmonics``).
    ``gated`` reads the first. The second is not a safer gate: that part may come from sources outside the brain (a
    distant harmonic field of 0.005 ppm std took held-out brain 31004's ratio from 0.93 to 1.20, 0.91 without it) or
    from a broad error of PDI's own map (the first, procedural-trained model on realistic brain 32005: 1.44, 0.82
    without it, where fine-tuning everywhere took 103.5 % demeaned NRMSE to 61.8); session 39."""
    inside = np.asarray(mask) > 0
    ratio = residual_over_cone(field, inside, geometry, weight, residual)
    free = without_harmonics(residual, inside, geometry.voxel_size, weight)
    return ratio, ratio * float(np.linalg.norm(free[inside]) / max(np.linalg.norm(residual[inside]), 1e-30))


def discrepant_region(field: np.ndarray, mask: np.ndarray, geometry, weight: np.ndarray, mean: np.ndarray,
                      ratio: float = DISCREPANCY_RATIO, depth_mm: float = DISCREPANCY_DEPTH_MM,
                      residual: np.ndarray | None = None) -> np.ndarray:
    """Where the field disagrees with PDI's map ``mean`` beyond what a healthy brain's field does: a blend weight in
    [0, 1] (0 outside the mask) for the fine-tuned map over PDI's.

    PDI was trained on realistic fields whose non-dipolar part (background residue, anisotropy, correlated noise)
    its map rightly leaves unexplained; fine-tuning on the whole field fits that part into chi and, on healthy
    realistic brains, made the map worse (benchmarks/results/vi_harm.md). Where the network meets what it never saw
    (a bleed, a large lesion) its map leaves a dipole pattern in the residual that stands out of the brain's own.
    The rule: r = W (D mean - b); its local RMS (a Gaussian window of ``DISCREPANCY_WINDOW_MM``) over the median of
    that RMS more than ``depth_mm`` inside the mask's edge (over the whole mask if under 100 voxels lie that deep);
    the voxels that deep whose ratio exceeds ``ratio``, smoothed by a Gaussian of ``DISCREPANCY_BLEND_MM``. Near the
    edge nothing is taken: there a healthy field's residue reaches many times the deep median. ``residual``: r when
    already computed (``weighted_residual``)."""
    inside = np.asarray(mask) > 0
    if residual is None:
        residual = weighted_residual(field, mask, geometry, weight, mean)
    sigma = [DISCREPANCY_WINDOW_MM / h for h in geometry.voxel_size]
    cover = ndimage.gaussian_filter(inside.astype(np.float64), sigma)
    local = np.sqrt(ndimage.gaussian_filter(residual**2, sigma) / np.maximum(cover, 1e-3))
    depth = ndimage.distance_transform_edt(inside, sampling=geometry.voxel_size)
    deep = inside & (depth > depth_mm)
    reference = np.median(local[deep if deep.sum() >= 100 else inside])
    taken = deep & (local > ratio * reference)
    blend = ndimage.gaussian_filter(taken.astype(np.float64), [DISCREPANCY_BLEND_MM / h for h in geometry.voxel_size])
    return np.clip(blend, 0.0, 1.0) * inside
