"""Unit conversion, gradient adjointness, data weight and MEDI's gradient mask."""

import math

import numpy as np
import pytest
import torch

from PDIQSMLib.errors import InputError
from PDIQSMLib.gradient import grad, grad_adjoint
from PDIQSMLib.units import GAMMA_MHZ_PER_T, ppm_per_unit, to_ppm
from PDIQSMLib.weighting import data_weight, edge_threshold, gradient_mask


def test_hz_to_ppm_at_3t():
    # 1 ppm at 3 T is gamma * 3 T * 1e-6 = 127.73 Hz
    hz = GAMMA_MHZ_PER_T * 3.0
    assert math.isclose(float(to_ppm(np.array([hz]), "hz", 3.0)[0]), 1.0, rel_tol=1e-12)
    assert math.isclose(127.7324, hz, rel_tol=1e-5)


def test_rad_to_ppm():
    # phase of 1 ppm after TE = 20 ms at 7 T: 2 pi * 42.577 MHz/T * 7 T * 1e-6 * 0.02 s
    phase = 2 * math.pi * GAMMA_MHZ_PER_T * 7.0 * 0.02
    assert math.isclose(float(to_ppm(np.array(phase), "rad", 7.0, 0.02)), 1.0, rel_tol=1e-12)
    assert ppm_per_unit("PPM") == 1.0


@pytest.mark.parametrize("units,b0,te,match", [("gauss", 3, None, "unknown units"), ("hz", None, None, "B0"),
                                               ("rad", 3.0, None, "TE"), ("rad", -1.0, 0.01, "B0"),
                                               ("rad", 3.0, 0.0, "TE")])
def test_unit_errors(units, b0, te, match):
    with pytest.raises(InputError, match=match):
        ppm_per_unit(units, b0, te)


def test_gradient_adjoint_identity_anisotropic():
    vs = (0.7, 1.0, 2.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 10, 7, dtype=torch.float64, generator=gen)
    g = torch.randn(3, 9, 10, 7, dtype=torch.float64, generator=gen)
    assert math.isclose(float((grad(x, vs) * g).sum()), float((x * grad_adjoint(g, vs)).sum()), rel_tol=1e-12)


def test_gradient_of_linear_ramp_is_its_slope_over_voxel_size():
    vs = (0.5, 1.0, 2.0)
    x = torch.arange(8, dtype=torch.float64).reshape(1, 1, 8).expand(6, 6, 8)  # +1 per voxel along axis 3
    g = grad(x, vs)
    assert torch.allclose(g[2, :, :, :-1], torch.full((6, 6, 7), 0.5, dtype=torch.float64))
    assert torch.all(g[0] == 0) and torch.all(g[1] == 0)


def test_data_weight_normalised_to_mean_one():
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    noise = np.ones((4, 4, 4))
    noise[1, 1, 1] = 2.0  # one noisier voxel gets half the weight of the others
    w = data_weight(mask, noise)
    assert math.isclose(float(w[mask].mean()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(w[1, 1, 1] / w[2, 2, 2]), 0.5, rel_tol=1e-6)
    assert np.all(w[~mask] == 0)
    assert np.array_equal(data_weight(mask), mask.astype(np.float32))


def test_data_weight_errors():
    with pytest.raises(InputError, match="empty"):
        data_weight(np.zeros((3, 3, 3)))
    with pytest.raises(InputError, match="positive"):
        data_weight(np.ones((3, 3, 3)), np.zeros((3, 3, 3)))
    with pytest.raises(InputError, match="shape"):
        data_weight(np.ones((3, 3, 3)), np.ones((3, 3, 2)))


def test_edge_threshold_leaves_ninety_percent_of_mask_count_above():
    rng = np.random.default_rng(0)
    values = rng.random(3000)
    t = edge_threshold(values, n_mask=1000, fraction=0.9)
    assert int((values > t).sum()) == 900


def test_gradient_mask_spares_edges_of_magnitude():
    shape = (20, 20, 20)
    mask = np.ones(shape, bool)
    mag = np.ones(shape)
    mag[:, :, 10:] = 3.0  # one strong edge plane across axis 3
    mag += 0.01 * np.random.default_rng(1).random(shape)
    m = gradient_mask(mask, mag, (1.0, 1.0, 1.0))
    assert m.shape == (3,) + shape
    assert np.all(m[2, :, :, 9] == 0)  # the edge's gradient component is excluded
    assert m.mean() > 0.6  # 90 % of N out of 3N components are above the threshold: 70 % stay
    assert np.array_equal(gradient_mask(mask, None, (1, 1, 1)), np.ones((3,) + shape, np.float32))


def test_progress_says_how_long_a_loop_will_take():
    import io

    from PDIQSMLib.progress import TIME_LEFT, Progress, eta_text, parse_line

    ticks = iter([0.0, 10.0, 20.0, 22.0, 40.0])  # the loop starts at 0; steps end at 10, 20, 22, 40 s
    out = io.StringIO()
    step = Progress("lines", out).task("vi", clock=lambda: next(ticks))
    for done in (1, 2, 3, 4):
        step(done, 4)
    lines = out.getvalue().splitlines()
    assert [parse_line(x) for x in lines if x.startswith("PROGRESS")] == [(d, 4, "vi") for d in (1, 2, 3, 4)]
    # 10 s for the first step: 30 s left; at 22 s (3 done) only 2 s after the last note: no new one; none at the end
    assert [x for x in lines if x.startswith("STATUS")] == ["STATUS vi: about 30 s left", "STATUS vi: about 20 s left"]
    assert eta_text(600.0, 1, 3) == "about 20 min left" and eta_text(5.0, 0, 3) is None
    # a loop that stops when it has converged (MEDI, PDI-VI) gives its count as a bound, and the time left as one
    ticks = iter([0.0, 10.0, 20.0])
    out = io.StringIO()
    step = Progress("lines", out).task("medi", clock=lambda: next(ticks), may_stop_early=True)
    step(1, 4)
    step(2, 2)  # converged at the second step: the loop is reported complete, nothing left to say
    assert [x for x in out.getvalue().splitlines() if x.startswith("STATUS")] == ["STATUS medi: up to 30 s left"]
    assert eta_text(600.0, 1, 3, bound=True) == "up to 20 min left"
    # the Slicer panel keeps these notes beside the count (slicer_logic.StatusText): its pattern reads every form
    notes = [f"vi: {eta_text(t, 1, 3, bound=b)}" for t in (5.0, 600.0) for b in (False, True)]
    assert [TIME_LEFT.match(x).group(2) for x in notes] == ["about 10 s left", "up to 10 s left", "about 20 min left",
                                                             "up to 20 min left"]
    assert TIME_LEFT.match("vi: the field disagrees with PDI's map") is None


def test_progress_of_a_resumed_loop_counts_only_its_own_steps():
    """Training resumed at step 2600 of 9000: the pace is that of the steps done since, not 2600 in 10 s."""
    import io

    from PDIQSMLib.progress import Progress

    ticks = iter([0.0, 10.0, 20.0])
    out = io.StringIO()
    step = Progress("lines", out).task("train", clock=lambda: next(ticks))
    step(2601, 9000)
    step(2602, 9000)
    notes = [x for x in out.getvalue().splitlines() if x.startswith("STATUS")]
    # 10 s a step, 6399 then 6398 steps left: 1066 min each time; a pace of 2601 steps in 10 s would say 0 min
    assert notes == ["STATUS train: about 1066 min left"] * 2


def _noisy_bleed_case(level=1e-3, ratio=30.0, seed=0):
    """A 64^3 brain (sphere, radius 28) with a 1.2 ppm bleed (sphere, radius 7, off centre) and a vein-like strong
    source, both with partial volume at their edges (a 0.75-voxel blur): the noiseless dipole field, white noise of
    ``level`` ppm, and inside the bleed noise ``ratio`` times it."""
    from scipy import ndimage

    from PDIQSMLib import phantoms
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.simulation import field_of

    shape, vs = (64, 64, 64), (1.0, 1.0, 1.0)
    g = Geometry(vs)
    mask = phantoms.sphere(shape, vs, 28.0, 1.0) > 0
    bleed = phantoms.sphere(shape, vs, 7.0, 1.0, (40.0, 30.0, 32.0)) > 0
    chi = np.where(bleed, 1.2, 0.0) + phantoms.sphere(shape, vs, 3.0, -0.6, (20.0, 36.0, 30.0))
    chi = np.where(mask, ndimage.gaussian_filter(chi, 0.75), 0.0).astype(np.float32)
    clean = field_of(chi, mask, g, pad=2.0)
    rng = np.random.default_rng(seed)
    noise = np.where(bleed, ratio * level, level)
    return clean, clean + np.where(mask, rng.normal(0.0, 1.0, shape) * noise, 0.0), mask, bleed, chi, g


def test_noisy_regions_find_a_bleed_whose_field_is_noise_and_nothing_in_clean_fields():
    """weighting.noisy_regions: the strong dipole fields of a clean field (a 1.2 ppm bleed, a -0.6 ppm source) are not
    noise (None, also with white noise alone); where the field is 30 times the brain's white noise, the region is
    found: most of the bleed's core (its voxels more than two inside its surface), nothing more than a voxel beyond
    it, relative noise over 10 there (so W < 0.1 x median: network_io.unreliable_voxels), 1 elsewhere."""
    from scipy import ndimage

    from PDIQSMLib.network_io import unreliable_voxels
    from PDIQSMLib.weighting import noisy_regions

    clean, noisy, mask, bleed, _, _ = _noisy_bleed_case()
    assert noisy_regions(clean, mask) is None
    white = clean + np.where(mask, np.random.default_rng(1).normal(0.0, 1e-3, mask.shape), 0.0)
    assert noisy_regions(white, mask) is None
    found = noisy_regions(noisy, mask)
    assert found is not None and found.shape == mask.shape
    hot = found > 1
    core = ndimage.binary_erosion(bleed, iterations=2)
    assert hot[core].mean() > 0.85 and hot[bleed].mean() > 0.35  # measured 0.90 and 0.40: the erosion spares the rim
    assert not (hot & ~ndimage.binary_dilation(bleed)).any()
    assert found[hot].min() > 10 and np.all(found[~hot] == 1)
    assert np.array_equal(unreliable_voxels(mask, data_weight(mask, found)), hot)


def test_pdi_reads_the_noisy_regions_off_the_field_when_no_noise_map_is_given():
    """The phantom's bleed with noise 100 times the brain's, no noise map: PDI (bundled model) with the default
    --noisy-regions auto is as accurate outside the bleed as with the true noise map, and far better than trusting
    every voxel (measured: brain outside the bleed 58.0 % auto, 56.9 true map, 70.2 off); the run says what it
    found; a given noise map is used as it is (nothing read off the field)."""
    from PDIQSMLib.pipeline import Settings, reconstruct

    _, noisy, mask, bleed, chi, g = _noisy_bleed_case(ratio=100.0)
    outside = mask & ~bleed

    def error(noise_std=None, **kw):
        r = reconstruct(noisy, mask, g, Settings(method="pdi", device="cpu", **kw), noise_std=noise_std)
        e = (r.mean - chi)[outside]
        return 100 * float(np.sqrt(np.mean(e**2) / np.mean(chi[outside] ** 2))), r.info

    off, info_off = error(noisy_regions="off")
    auto, info = error()
    true, info_true = error(np.where(bleed, 100.0, 1.0))
    assert info["noisy_regions"]["voxels"] > 500 and "noisy_regions" not in info_off | info_true
    assert auto < true + 3 and auto < off - 8


def test_finetuning_a_set_reads_the_noisy_regions_too(tmp_path, monkeypatch):
    """pdiqsm finetune: a field given without its noise std map gets the noisy regions read off it (auto, the
    default), as reconstruct does; with off, or with a map given, no map is made up."""
    from conftest import write_nifti

    from PDIQSMLib import pipeline
    from PDIQSMLib.weighting import noisy_regions

    _, noisy, mask, _, _, _ = _noisy_bleed_case(ratio=100.0)
    field = write_nifti(tmp_path / "f.nii.gz", noisy, np.eye(4))
    mask_path = write_nifti(tmp_path / "m.nii.gz", mask.astype(np.float32), np.eye(4))
    given = write_nifti(tmp_path / "n.nii.gz", np.ones(mask.shape, np.float32), np.eye(4))
    seen = []

    class Stop(Exception):
        pass

    def record(net, field_ppm, mask_, geometry, magnitude, noise, *args, **kwargs):
        seen.append(noise)
        raise Stop

    monkeypatch.setattr(pipeline, "vi_volume", record)
    for regions, noise_paths in (("auto", None), ("off", None), ("auto", [given])):
        with pytest.raises(Stop):
            pipeline.finetune_files([field], [mask_path], tmp_path / "w.safetensors",
                                    pipeline.Settings(method="pdi-vi1", noisy_regions=regions, device="cpu"), noise_paths)
    expected = noisy_regions(nib_data(field), mask)
    assert np.array_equal(seen[0], expected) and (expected > 1).sum() > 500
    assert seen[1] is None and np.all(seen[2] == 1)


def test_finetuning_a_set_takes_each_fields_trend_off_as_reconstruct_does(tmp_path, monkeypatch):
    """pdiqsm finetune --field-trend remove: a linear field of 0.02 ppm per 100 mm along B0 added to one field of a
    set is fitted beside PDI's map and taken off before fine-tuning (the field tuned on moves by under a tenth of the
    ramp against the same field without it), and the manifest gives each field's fitted slopes (the ramp's within 10 %);
    with keep (the default) the set is tuned on the ramp, less its mean, and no trend is recorded."""
    from conftest import write_nifti

    from PDIQSMLib import pipeline
    from PDIQSMLib.simulation import simulated_brain

    s = simulated_brain((48, 52, 40), (1.0, 1.0, 1.5), seed=3, noise_ppm=1e-3)
    m = s.mask > 0
    coord = np.indices(m.shape)[2].astype(np.float64)
    ramp = np.where(m, 0.02 * (coord - coord[m].mean()) * 1.5 / 100.0, 0.0)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    plain = write_nifti(tmp_path / "plain.nii.gz", s.field, affine)
    tilted = write_nifti(tmp_path / "tilted.nii.gz", np.where(m, s.field + ramp, 0.0), affine)
    mask_path = write_nifti(tmp_path / "m.nii.gz", m.astype(np.float32), affine)
    seen, original = [], pipeline.vi_volume

    def record(net, field_ppm, *args, **kwargs):
        seen.append(np.array(field_ppm, np.float64))
        return original(net, field_ppm, *args, **kwargs)

    monkeypatch.setattr(pipeline, "vi_volume", record)
    manifests = {}
    for trend in ("remove", "keep"):
        settings = pipeline.Settings(method="pdi-vi1", device="cpu", iterations=1, field_trend=trend)
        manifests[trend] = pipeline.finetune_files([plain, tilted], [mask_path, mask_path],
                                                   tmp_path / f"{trend}.safetensors", settings)
    moved = np.abs(seen[1] - seen[0])[m].mean()
    assert moved < 0.1 * np.abs(ramp)[m].mean(), moved
    assert np.allclose((seen[3] - seen[2])[m], ramp[m] - ramp[m].mean(), atol=2e-5)
    fields = manifests["remove"]["fields_prepared"]
    assert [f["field"] for f in fields] == [str(plain), str(tilted)] and manifests["remove"]["field_trend"] == "remove"
    slopes = [np.array(f["field_trend"]["ppm_per_100mm_along_voxel_axes"]) for f in fields]
    assert abs(slopes[1][2] - slopes[0][2] - 0.02) < 0.002 and np.abs((slopes[1] - slopes[0])[:2]).max() < 0.002
    assert all("field_trend" not in f and "field_mean_removed_ppm" in f for f in manifests["keep"]["fields_prepared"])


def nib_data(path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def test_the_rim_check_trusts_a_straight_or_bending_continuation_and_marks_departures():
    """weighting.rim_check on a cube region (8-15 on each axis, its core 9-14) of a 24^3 volume: a steep linear field
    (0.05 ppm a voxel) continues straight, so no rim voxel is marked (only the core); a quadratic field bends by 0.02-
    0.04 ppm a voxel, far over the threshold: the rim's outer layer, whose lines out are clean, is spared by the bend
    allowance and marked without it, and lends its bend inward only where it bent by a few thresholds at most; spikes
    of 0.5 ppm on the rim are marked; nothing outside the rim ever is."""
    from scipy import ndimage

    from PDIQSMLib.weighting import rim_check

    shape = (24, 24, 24)
    mask = np.ones(shape, bool)
    region = np.zeros(shape, bool)
    region[8:16, 8:16, 8:16] = True
    core = ndimage.binary_erosion(region)
    rim = ndimage.binary_dilation(region, np.ones((3, 3, 3), bool)) & ~core
    outer = rim & ~region
    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    linear = 0.05 * x - 0.03 * y + 0.02 * z
    assert np.array_equal(rim_check(linear, mask, region, core, 1e-3, 4.0), core)
    quadratic = 0.02 * (x - 12) ** 2 - 0.015 * (y - 12) ** 2 + 0.01 * (z - 12) ** 2
    spared = rim_check(quadratic, mask, region, core, 1e-3, 4.0)
    assert not spared[outer].any() and not (spared & ~rim & ~core).any()
    assert rim_check(quadratic, mask, region, core, 1e-3, 0.0)[outer].all()
    # the outer layer departs by 0.02-0.04 ppm, far over 3 times the threshold: it lends no bend to the layer inside
    # it, which is marked (a noisy voxel let through must not excuse the ones behind it); a gentle bend of 2-2.8e-3
    # ppm (2-2.8 times the threshold) is lent on, and the whole rim is spared
    assert spared[region & ~core].all()
    gentle = 0.0014 * (x - 12) ** 2 - 0.00125 * (y - 12) ** 2 + 0.001 * (z - 12) ** 2
    assert np.array_equal(rim_check(gentle, mask, region, core, 1e-3, 4.0), core)
    assert rim_check(gentle, mask, region, core, 1e-3, 4.0, firm_level=1.0)[region & ~core].all()
    spikes = np.zeros(shape, bool)
    for v in ((7, 10, 10), (16, 12, 9), (11, 7, 14), (13, 12, 16)):
        spikes[v] = True
    found = rim_check(linear + 0.5 * spikes, mask, region, core, 1e-3, 4.0)
    assert found[spikes].all() and found[core].all() and not (found & ~rim & ~core).any()
    assert (found & rim & ~spikes).sum() <= 4  # voxels whose every straight line out runs through a spike


def test_a_noisy_regions_rim_is_checked_voxel_by_voxel():
    """The phantom's bleed with noise 30 and 300 times the brain's: the median window misses its rim (measured: 0.40
    and 0.80 of the bleed found); the rim check finds more of it (0.60 and 0.94), marking nothing over two voxels
    from the bleed and nothing under NOISY_RIM_LEVEL, and keeps every voxel the region held; PDI and MEDI outside the
    bleed gain and come close to their accuracy with the true noise map (measured, % RMSE, checked / without / true
    map: at 30x PDI 50.3 / 55.6 / 56.9, MEDI 37.9 / 40.4 / 38.1; at 300x PDI 54.8 / 75.0 / 56.9, MEDI 40.2 / 65.1 /
    38.0)."""
    from scipy import ndimage

    from PDIQSMLib import weighting
    from PDIQSMLib.pipeline import Settings, reconstruct

    for ratio, share, gain in ((30.0, 0.5, 1.0), (300.0, 0.9, 8.0)):
        _, noisy, mask, bleed, chi, g = _noisy_bleed_case(ratio=ratio)
        without = weighting.noisy_regions(noisy, mask, rim=False) > 1
        found = weighting.noisy_regions(noisy, mask)
        hot = found > 1
        assert without[bleed].mean() < share - 0.05 and hot[bleed].mean() > share
        assert (hot & without).sum() == without.sum()
        assert not (hot & ~ndimage.binary_dilation(bleed, iterations=2)).any()
        assert found[hot & ~without].min() >= weighting.NOISY_RIM_LEVEL
        outside = mask & ~bleed

        def error(method, noise_std=None):
            settings = Settings(method=method, device="cpu")
            e = (reconstruct(noisy, mask, g, settings, noise_std=noise_std).mean - chi)[outside]
            return 100 * float(np.sqrt(np.mean(e**2) / np.mean(chi[outside] ** 2)))

        true = np.where(bleed, ratio, 1.0)
        for method in ("pdi", "medi"):
            checked = error(method, found)
            assert checked < error(method, np.where(without, found, 1.0)) - gain and checked < error(method, true) + 8


def test_discrepant_region_takes_a_deep_source_the_map_missed_and_nothing_else():
    """PDI-VI's fine-tuned map is kept where the field disagrees with PDI's map beyond the brain's own residue
    (``weighting.discrepant_region``). A field D chi + white noise: with chi itself as the map the residual is the
    noise, uniform, and nothing is taken; with a map that misses a deep 1 ppm sphere (a bleed the network shrank) the
    residual is that sphere's dipole field: taken around it, and nowhere near the mask's edge."""
    from scipy import ndimage

    from PDIQSMLib import phantoms
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.simulation import field_of
    from PDIQSMLib.weighting import DISCREPANCY_BLEND_MM, DISCREPANCY_DEPTH_MM, discrepant_region

    g = Geometry((1.0, 1.0, 1.5))
    shape = (72, 72, 48)
    mask = phantoms.sphere(shape, g.voxel_size, 32.0, 1.0) > 0
    rng = np.random.default_rng(3)
    chi = np.where(mask, 0.02 * ndimage.gaussian_filter(rng.standard_normal(shape), 2.0), 0.0)
    ball = phantoms.sphere(shape, g.voxel_size, 4.0, 1.0, center=(40, 32, 24)) > 0
    truth = np.where(ball, 1.0, chi)
    field = np.where(mask, field_of(truth.astype(np.float32), mask, g, 2.0) + 1e-3 * rng.standard_normal(shape), 0.0)
    w = data_weight(mask)
    assert not discrepant_region(field, mask, g, w, truth).any()  # the right map: only noise is left, nothing taken
    blend = discrepant_region(field, mask, g, w, chi)  # the map that missed the sphere
    assert blend.min() >= 0.0 and blend.max() <= 1.0 and not blend[~mask].any()
    assert blend[ball].mean() > 0.9 and 20 < (blend > 0.5).sum() < 0.1 * mask.sum()
    depth = ndimage.distance_transform_edt(mask, sampling=g.voxel_size)
    assert blend[mask & (depth < DISCREPANCY_DEPTH_MM - 3 * DISCREPANCY_BLEND_MM)].max() < 0.01


def test_without_harmonics_takes_off_exactly_what_sources_outside_the_mask_could_make():
    """``weighting.without_harmonics``: a weighted residual W h, h any sum of the nine solid harmonics up to degree 2
    (each of zero Laplacian: the 7-point Laplacian of a quadratic is exact), goes to zero; noise keeps all but its
    projection (orthogonal to every W h_k after, idempotent, norm down by about 9 / N); degree 1 leaves a quadratic
    harmonic in place."""
    from PDIQSMLib import phantoms
    from PDIQSMLib.weighting import harmonic_basis, solid_harmonics, without_harmonics

    vs = (0.8, 1.0, 2.0)
    mask = phantoms.sphere((40, 36, 24), vs, 14.0, 1.0) > 0
    grids = np.indices(mask.shape).astype(np.float64)
    x, y, z = ((gr - 7.0) * h / 100.0 for gr, h in zip(grids, vs))
    for t in solid_harmonics(x, y, z)[1:]:  # harmonic: the Laplacian on the grid (spacing h) vanishes
        lap = sum((np.roll(t, 1, a) - 2 * t + np.roll(t, -1, a))[1:-1, 1:-1, 1:-1] / (h / 100.0) ** 2
                  for a, h in enumerate(vs))
        assert np.abs(lap).max() < 1e-8
    rng = np.random.default_rng(0)
    w = np.where(mask, rng.uniform(0.5, 2.0, mask.shape), 0.0)
    basis = harmonic_basis(mask, vs)
    h = np.zeros(mask.shape)
    h[mask] = basis @ rng.normal(size=9)
    assert basis.shape == (mask.sum(), 9)
    assert np.abs(without_harmonics(w * h, mask, vs, w)).max() < 1e-9 * np.abs(w * h).max()
    noise = np.where(mask, rng.standard_normal(mask.shape), 0.0)
    left = without_harmonics(noise, mask, vs, w)
    assert np.abs((basis * w[mask][:, None]).T @ left[mask]).max() < 1e-8
    assert np.allclose(without_harmonics(left, mask, vs, w), left, atol=1e-10)
    assert 0 < 1 - np.linalg.norm(left) ** 2 / np.linalg.norm(noise) ** 2 < 30 / mask.sum()
    quad = np.zeros(mask.shape)
    quad[mask] = basis[:, 4]  # xy about the mask's centre
    assert np.allclose(without_harmonics(quad, mask, vs, degree=2), 0.0, atol=1e-12)
    linear_left = without_harmonics(quad, mask, vs, degree=1)
    assert np.linalg.norm(linear_left) > 0.9 * np.linalg.norm(quad[mask] - quad[mask].mean())


def test_residual_over_cone_compares_what_the_map_leaves_with_what_no_map_explains():
    """PDI-VI1's gate (``weighting.residual_over_cone``): the RMS of W (D mean - b) over the field's cone noise level.
    White noise alone and a map of zeros: the residual is the noise and the cone reads the noise, so about 1; a smooth
    tissue field and its own map leave the noise too (about 1, within the gate's band: fine-tuning kept where the
    field disagrees). A 1 ppm sphere whose map is right: its field, truncated by the mask, fills the cone, and the
    ratio falls below the band; a map that missed it leaves its dipole field, far above it (either: everywhere)."""
    import torch
    from scipy import ndimage

    from PDIQSMLib import phantoms
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.physics import DipoleOperator
    from PDIQSMLib.fieldterms import distant_harmonics
    from PDIQSMLib.weighting import GATE_BAND, gate_ratios, gated, residual_over_cone, weighted_residual

    g = Geometry((1.0, 1.0, 1.5))
    shape = (72, 72, 48)
    mask = phantoms.sphere(shape, g.voxel_size, 32.0, 1.0) > 0
    rng = np.random.default_rng(3)
    chi = np.where(mask, 0.02 * ndimage.gaussian_filter(rng.standard_normal(shape), 2.0), 0.0)
    truth = np.where(phantoms.sphere(shape, g.voxel_size, 4.0, 1.0, center=(40, 32, 24)) > 0, 1.0, chi)
    op = DipoleOperator(shape, g, 1.5, torch.float64)  # the residual's own operator: no model error in the field

    def field(c):
        return np.where(mask, op.forward(torch.from_numpy(c)).numpy() + 1e-3 * rng.standard_normal(shape), 0.0)

    w = data_weight(mask)

    def ratio(b, mean):
        return residual_over_cone(b, mask, g, w, weighted_residual(b, mask, g, w, mean))

    assert 0.9 < ratio(field(np.zeros(shape)), np.zeros(shape)) < 1.1  # measured 0.99-1.01
    assert GATE_BAND[0] < ratio(field(chi), chi) < GATE_BAND[1]  # measured 1.08-1.09: at the noise floor
    assert ratio(field(truth), truth) < 0.6 * GATE_BAND[0]  # measured 0.39
    assert ratio(field(truth), chi) > 2.5 * GATE_BAND[1]  # measured 5.1
    # a distant sources' field (harmonic, 3e-3 ppm std) lifts the ratio over the band; without the residual's
    # harmonic part it falls under the band's top again, while a missed sphere's dipole field stays far over it
    far = np.where(mask, 3e-3 * distant_harmonics(mask, g, np.random.default_rng(5)), 0.0)
    for b, mean, under in ((field(chi) + far, chi, True), (field(truth) + far, chi, False)):
        plain, free = gate_ratios(b, mask, g, w, weighted_residual(b, mask, g, w, mean))
        assert plain > GATE_BAND[1] and gated(plain) == "everywhere" and (free < GATE_BAND[1]) == under, (plain, free)


def test_the_fields_mean_is_its_inverse_variance_weighted_mean_so_a_noisy_regions_field_does_not_set_it():
    """``without_mean``: a constant c in the brain plus a 50 ppm error in a region whose noise std is 1000 times the
    brain's: the mean removed is c to 1e-4 (the plain mean would be 50 times the region's share off); without a noise
    map it is the plain mean; outside the mask the field is zero."""
    from PDIQSMLib.weighting import without_mean

    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    region = np.zeros_like(mask)
    region[5:9, 5:9, 5:9] = True
    field = np.where(mask, 0.3 + 50.0 * region, 7.0)
    noise = np.where(region, 1000.0, 1.0)
    out, c = without_mean(field, mask, noise)
    assert abs(c - 0.3) < 1e-4 and np.all(out[~mask] == 0)
    assert np.allclose(out[mask & ~region], 0.3 - c, atol=1e-6)
    out, c = without_mean(field, mask)
    assert math.isclose(c, 0.3 + 50.0 * region.sum() / mask.sum(), rel_tol=1e-9)
    assert abs(float(out[mask].mean())) < 1e-5


@pytest.mark.parametrize("method", ["tikhonov", "pdi"])
def test_a_constant_added_to_the_field_leaves_the_map_as_it_was_unless_kept(method):
    """A constant is harmonic inside the brain (an unwrapping's 2 pi n: 0.39 ppm at 3 T, TE 20 ms): with the field's
    mean removed (the default), the map of field + 0.39 ppm equals the map of the field and the record gives the
    mean taken off (0.39 more); with ``field_mean='keep'`` the map changes by far more than that equality's rounding."""
    from PDIQSMLib.pipeline import Settings, reconstruct
    from PDIQSMLib.simulation import simulated_brain

    s = simulated_brain((40, 44, 32), (1.0, 1.0, 1.5), seed=3, noise_ppm=1e-3)
    m = s.mask > 0
    shifted = np.where(m, s.field + 0.39, 0.0).astype(np.float32)
    settings = Settings(method=method, device="cpu", lam=3e-3 if method == "tikhonov" else None)
    a, b = (reconstruct(f, s.mask, s.geometry, settings) for f in (s.field, shifted))
    assert math.isclose(b.info["field_mean_removed_ppm"] - a.info["field_mean_removed_ppm"], 0.39, abs_tol=1e-5)
    scale = float(np.abs(a.mean[m]).max())
    assert np.abs(b.mean - a.mean).max() < 1e-3 * scale
    kept = reconstruct(shifted, s.mask, s.geometry, Settings(**{**settings.__dict__, "field_mean": "keep"}))
    assert "field_mean_removed_ppm" not in kept.info
    assert np.abs(kept.mean - a.mean)[m].mean() > 0.05 * np.abs(a.mean[m]).mean()


@pytest.mark.parametrize("axis,slope", [(0, 0.02), (2, -0.03)])
def test_a_linear_trend_added_to_the_field_is_fitted_beside_pdis_map_and_taken_off(axis, slope):
    """``--field-trend remove``: a linear field (harmonic) of ``slope`` ppm per 100 mm added across B0 (axis 0) or
    along it (axis 2) raises the fitted slope along that axis by the slope added (within 10 %, the other axes'
    within 0.002), and PDI's map then stays within a twentieth of what keeping the trend moves it by."""
    from PDIQSMLib.pipeline import Settings, reconstruct
    from PDIQSMLib.simulation import simulated_brain

    s = simulated_brain((48, 52, 40), (1.0, 1.0, 1.5), seed=3, noise_ppm=1e-3)
    m = s.mask > 0
    coord = np.indices(m.shape)[axis].astype(np.float64)
    ramp = slope * (coord - coord[m].mean()) * s.geometry.voxel_size[axis] / 100.0
    tilted = np.where(m, s.field + ramp, 0.0).astype(np.float32)
    removed = Settings(method="pdi", device="cpu", field_trend="remove")
    base, fitted = (reconstruct(f, s.mask, s.geometry, removed) for f in (s.field, tilted))
    kept = reconstruct(tilted, s.mask, s.geometry, Settings(method="pdi", device="cpu"))
    change = np.subtract(fitted.info["field_trend"]["ppm_per_100mm_along_voxel_axes"],
                         base.info["field_trend"]["ppm_per_100mm_along_voxel_axes"])
    assert abs(change[axis] - slope) < 0.1 * abs(slope) and np.abs(np.delete(change, axis)).max() < 0.002
    assert "field_trend" not in kept.info
    assert np.abs(fitted.mean - base.mean)[m].mean() < 0.05 * np.abs(kept.mean - base.mean)[m].mean()
