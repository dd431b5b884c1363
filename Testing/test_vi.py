"""PDI-VI: the KL loss by hand, the flat prior, fine-tuning behaviour, and bad settings."""

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from PDIQSMLib import phantoms
from PDIQSMLib.defaults import VI_LAMBDA, VI_LAMBDA_PDI_EDGES
from PDIQSMLib.errors import InputError
from PDIQSMLib.geometry import Geometry
from PDIQSMLib.physics import DipoleOperator
from PDIQSMLib.simulation import add_noise, field_of
from PDIQSMLib.vi import VIConfig, finetune, kl_loss, predict_volume, prepare


def tiny_volume(shape=(8, 8, 8), blind_degree=-1):
    g = Geometry((1.0, 1.0, 1.0))
    mask = np.ones(shape, bool)
    field = np.zeros(shape, np.float32)
    return prepare(field, mask, g, stride=2, blind_degree=blind_degree)


def test_kl_by_hand_with_zero_variance_draws():
    v = tiny_volume(blind_degree=2)  # the data term blind to the solid harmonics (--vi-harmonics ignore)
    n = v.mask.numel()
    mean = torch.zeros_like(v.field)
    logvar = torch.full_like(v.field, -40.0)  # sigma ~ 2e-9: every draw equals the mean
    terms = kl_loss(mean, logvar, v, lam=0.0, samples=3, noise_level=0.5)
    assert math.isclose(float(terms["entropy"]), 20.0 * n, rel_tol=1e-6)  # -1/2 sum log sigma^2
    assert float(terms["fidelity"]) < 1e-12 and float(terms["tv"]) == 0.0
    # a field b = +-0.1 in a checkerboard with chi = 0: data term = 1/(2 s^2) * n * 0.1^2 (the checkerboard is
    # orthogonal to every polynomial of degree <= 2 on the cube: each monomial leaves an axis of alternating sum 0)
    checker = torch.from_numpy((-1.0) ** np.indices((8, 8, 8)).sum(0)).float()[None, None]
    v.field += 0.1 * checker * v.mask
    terms = kl_loss(mean, logvar, v, lam=0.0, samples=3, noise_level=0.5)
    assert math.isclose(float(terms["fidelity"]), n * 0.01 / (2 * 0.25), rel_tol=1e-4)
    # a constant or any field of sources outside the mask (solid harmonics up to degree 2): the data term is blind to it
    x, y, z = (torch.from_numpy(a).float()[None, None] for a in np.indices((8, 8, 8)) - 3.5)
    v.field += 0.1 + 0.02 * x - 0.03 * z + 0.01 * x * y + 0.004 * (x**2 - y**2)
    terms = kl_loss(mean, logvar, v, lam=0.0, samples=3, noise_level=0.5)
    assert math.isclose(float(terms["fidelity"]), n * 0.01 / (2 * 0.25), rel_tol=1e-4)
    v.blind = None  # without the projection (the default, --vi-harmonics keep): the whole misfit
    assert float(kl_loss(mean, logvar, v, lam=0.0, samples=3, noise_level=0.5)["fidelity"]) > 1.5 * n * 0.01 / 0.5


def test_tv_term_by_hand_and_flat_prior():
    v = tiny_volume()
    mean = torch.zeros_like(v.field)
    mean[..., 4:, :, :] = 0.2  # one step of 0.2 ppm along axis 1, plus the periodic wrap step
    logvar = torch.full_like(v.field, -40.0)
    terms = kl_loss(mean, logvar, v, lam=0.5, samples=2, noise_level=1.0)
    steps = 2 * 8 * 8  # two planes of 64 jumps of 0.2
    assert math.isclose(float(terms["tv"]), 0.5 * 0.5 * steps * 0.2, rel_tol=1e-4)
    assert float(kl_loss(mean, logvar, v, lam=0.0, samples=2, noise_level=1.0)["tv"]) == 0.0


@pytest.mark.parametrize("kwargs,match", [({"samples": 0}, "K must"), ({"lam": -1.0}, "lambda"),
                                          ({"iterations": 0}, "iterations"), ({"variant": "some"}, "variant"),
                                          ({"estimator": "pc"}, "estimator"), ({"variance": "x"}, "variance"),
                                          ({"precision": "fp16"}, "precision")])
def test_bad_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        VIConfig(**kwargs).check()


def test_variant_defaults_per_volume_and_on_a_set_and_what_sigma_a_set_keeps():
    from PDIQSMLib.pipeline import Settings, set_sigma, vi_config

    assert vi_config(Settings(method="pdi-vi2")).variant == "decoders"
    assert vi_config(Settings(method="pdi-vi1", vi_variant="full")).variant == "full"
    assert vi_config(Settings(method="pdi-vi1", vi_variant="last")).variant == "last"
    with pytest.raises(InputError, match="variant"):
        vi_config(Settings(method="pdi-vi1", vi_variant="encoder"))
    text, calibrated = set_sigma(VIConfig(variant="decoders"))
    assert text.startswith("base network") and calibrated
    text, calibrated = set_sigma(VIConfig(variant="full"))
    assert "not calibrated" in text and not calibrated
    text, calibrated = set_sigma(VIConfig(variant="last", variance="network"))
    assert "collapses" in text and not calibrated


def lesion_brain(seed: int = 11, center=(38, 36, 24), shape=(64, 72, 48), value: float = 1.2, radius_mm: float = 5.0):
    """A small brain with an inserted lesion of ``value`` ppm (absent from training), noisy field."""
    vs = (1.5, 1.5, 2.0)
    g = Geometry(vs)
    rng = np.random.default_rng(seed)
    ph = phantoms.brain(shape, vs, rng)
    lesion = (phantoms.sphere(ph.chi.shape, vs, radius_mm, 1.0, center=center) > 0) & ph.mask
    chi = np.where(lesion, value, ph.chi).astype(np.float32)
    field = add_noise(field_of(chi, ph.mask, g, 2.0), ph.mask, 1e-3, rng)
    return chi, ph.mask, field, lesion, g


@pytest.fixture(scope="module")
def lesion_case():
    return lesion_brain()


def lesion_moment_error(m, chi, mask, lesion) -> float:
    """The error of the lesion's total susceptibility, sum(chi) over the lesion grown by 3 voxels (mask
    voxels), as a fraction of the lesion's own total. This is what the field outside a compact source
    fixes (its dipole moment); how the total is spread inside is not: a uniformly magnetised sphere
    has no field of its own inside, so the lesion's mean within its exact boundary is weakly determined."""
    from scipy import ndimage

    region = ndimage.binary_dilation(lesion, iterations=3) & mask
    return float(m[region].sum() - chi[region].sum()) / float(chi[lesion].sum())


@pytest.mark.parametrize("lam, edges, rmse_ratio", [(0.0, "magnitude", 0.97), (VI_LAMBDA, "magnitude", 1.3),
                                                     (VI_LAMBDA_PDI_EDGES, "pdi", 1.1)],
                         ids=["vi2", "vi1-tv-everywhere", "vi1-pdi-edges"])
def test_finetuning_on_an_unseen_lesion_fits_the_data_and_keeps_its_total(lesion_case, lam, edges, rmse_ratio):
    """PDI-VI2 (flat prior) and PDI-VI1 (TV prior: everywhere at lambda 3e-3, its default with a magnitude's edges or
    none; and its default without a magnitude, the edges of PDI's own map spared at 1e-2) per volume, default
    variant (the decoders), exact expectation, 100 iterations, on a brain with a 1.2 ppm lesion the model never saw.

    Measured with the bundled model (51183 steps, session 24; AMD EPYC, 2 threads): PDI itself gets the lesion's total
    susceptibility (``lesion_moment_error``) within 1 %; VI2 / VI1 at 3e-3 / VI1 with PDI's edges: misfit x0.10 /
    x0.13 / x0.12 (the loss's fidelity term, last over first), total -4 % / -9 % / -7 %, brain RMSE 40.2 -> 34.0 /
    48.0 / 38.8 % (ratio 0.85 / 1.19 / 0.97), lesion mean 1.26 -> 1.03 / 1.05 / 1.07 ppm. The weight average of
    session 22: within 2 %; x0.15 / x0.18 / x0.17, -4 % / -10 % / -8 %, 40.0 -> 33.4 / 48.6 / 39.8 % (0.84 / 1.21 /
    0.99), 1.24 -> 1.03 / 1.04 / 1.07 ppm. The 44441-step model: within 3 %; x0.16 / x0.19 / x0.18,
    -5 % / -9 % / -7 %, 39.9 -> 34.6 / 48.6 / 39.7 %, 1.22 -> 1.02 / 1.05 / 1.07 ppm. With the 27171-step model
    (Intel Xeon, 1 thread, ~55 s each),
    below: PDI's total within 1 % (19088 steps: 8 %, 10641: 9 %; 2200 CPU steps overestimated it by 83 %), and a
    3 ppm lesion of 6 mm was within 4 % at 10641 steps; VI2 / VI1 fit the data (misfit x0.15 / x0.18) and keep
    the total within -6 % / -11 %; VI2 lowers the brain RMSE 40.1 -> 37.2 % (ratio 0.93), VI1 does not: 50.0 % (ratio 1.25) at lambda 3e-3: TV flattens this
    procedural phantom's texture; 3e-3 was chosen on realistic brains, where 1e-3 fitted the non-dipolar
    field (``defaults.VI_LAMBDA``). Tuning every weight (``variant="full"``, 1.6x the time) gave 0.94 / 1.27
    and -7 % / -12 %. Both spread the lesion over its rim: its mean within the exact boundary 1.17 -> 1.01 /
    1.02 ppm (truth 1.2; the field of a uniform sphere fixes its total, not its spread). Broken on purpose
    (lr 0, so the map stays PDI's), the fidelity assert fails, and for VI2 the RMSE assert too.
    With PDI's edges at 1e-2 (session 15, same machine, 98 s): misfit x0.16, total -6.5 %, RMSE 40.1 -> 41.1 %
    (ratio 1.02, against 1.25 with TV everywhere: the texture the network sees is spared), lesion mean 1.17 -> 1.06.
    """
    from PDIQSMLib.pipeline import vi_volume
    from PDIQSMLib.weights import load_model

    chi, mask, field, lesion, g = lesion_case
    net, _ = load_model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    v = vi_volume(net, field, mask, g, edges=edges)  # 'magnitude' without one: TV everywhere, as prepare() alone
    mean0, _ = predict_volume(net, v)
    result = finetune(net, [v], VIConfig(lam=lam, iterations=100, estimator="exact"))
    # the default variant tunes the mean decoder only: the encoder is frozen (cached), and the log-variance
    # decoder stays (per-voxel sigma)
    tuned = result.net.state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in before if k.startswith("mean_decoder"))
    assert all(torch.equal(before[k], tuned[k]) for k in before if not k.startswith("mean_decoder"))
    mean1, std1 = result.predict(v)
    h = result.history
    assert h[-1]["fidelity"] < 0.2 * h[0]["fidelity"]
    assert abs(lesion_moment_error(mean0, chi, mask, lesion)) < 0.2  # measured -0.01: PDI generalises to it
    assert abs(lesion_moment_error(mean1, chi, mask, lesion)) < 0.2  # measured -0.04 / -0.09 / -0.07
    rmse = lambda m: np.linalg.norm(m[mask] - chi[mask]) / np.linalg.norm(chi[mask])  # noqa: E731
    # measured 0.85 / 1.19 / 0.97 (the weight average 0.84 / 1.21 / 0.99; 27171 steps 0.93 / 1.25 / 1.02)
    assert rmse(mean1) < rmse_ratio * rmse(mean0)
    assert float(mean1[lesion].mean()) < float(mean0[lesion].mean()) - 0.05  # the spread: 1.26 -> 1.03 / 1.05 / 1.07
    assert np.all(np.isfinite(std1)) and np.all(std1[mask] > 0)
    # the input network is untouched
    assert all(torch.equal(before[k], t) for k, t in net.state_dict().items())


def test_pdi_vi1_takes_its_tv_edges_from_pdis_map_unless_a_magnitude_is_given(lesion_case):
    """Without a magnitude, PDI-VI1's edge mask M is MEDI's rule applied to the network's own map (its 0.7 N
    strongest gradient components spared): the lesion's rim, which the network sees, is spared far more often than
    the brain at large, so TV does not flatten it. A magnitude, when given, is used instead ('auto'); 'pdi' with a
    magnitude is refused; 'magnitude' without one is TV everywhere (the mask)."""
    from scipy import ndimage

    from PDIQSMLib.inference import predict
    from PDIQSMLib.pipeline import vi_volume
    from PDIQSMLib.solvers import PDI_EDGE_FRACTION
    from PDIQSMLib.weighting import gradient_mask
    from PDIQSMLib.weights import load_model

    chi, mask, field, lesion, g = lesion_case
    net, _ = load_model()
    info: dict = {}
    v = vi_volume(net, field, mask, g, edges="auto", info=info)
    assert info["edges"].startswith("PDI's map")
    guide = predict(net, field, mask, "cpu", geometry=g)[0]
    expected = gradient_mask(mask, guide, g.voxel_size, PDI_EDGE_FRACTION)[(slice(None),) + v.box]
    x, y, z = v.size
    edges = v.edges[:, :x, :y, :z].numpy()
    assert np.array_equal(edges, expected)
    spared = (edges == 0).any(axis=0) & mask[v.box]
    rim = (ndimage.binary_dilation(lesion, iterations=1) & ~ndimage.binary_erosion(lesion, iterations=1) & mask)[v.box]
    assert spared[rim].mean() > 2 * spared[mask[v.box]].mean()
    magnitude = np.where(lesion, 0.2, 1.0)
    v = vi_volume(net, field, mask, g, magnitude=magnitude, edges="auto", info=info)
    assert info["edges"] == "magnitude"
    by_magnitude = gradient_mask(mask, magnitude, g.voxel_size)[(slice(None),) + v.box]
    assert np.array_equal(v.edges[:, :x, :y, :z].numpy(), by_magnitude)
    with pytest.raises(InputError, match="--vi-edges"):
        vi_volume(net, field, mask, g, magnitude=magnitude, edges="pdi")
    v = vi_volume(net, field, mask, g, edges="magnitude", info=info)
    assert info["edges"].startswith("none") and np.array_equal(v.edges[:, :x, :y, :z].numpy()[0], mask[v.box])


def test_pdi_vi1_reads_its_edges_from_the_pass_pdi_already_made(lesion_case, monkeypatch):
    """Where PDI-VI first runs PDI (--vi-where gated or discrepant), its TV edges come from that run's unmirrored pass
    instead of another network pass: predict's first pass equals a one-pass prediction to the bit, and the mirrored
    pass is the mirror of the network's map of the mirrored input (not the same map); through the pipeline, the
    network runs only PDI's two reflections before fine-tuning, the edge mask equals MEDI's rule on the one-pass
    map, and the fine-tuning is told which map it will return (PDI's outside the region where the field disagrees)."""
    from PDIQSMLib import inference, pipeline, vi
    from PDIQSMLib.solvers import PDI_EDGE_FRACTION
    from PDIQSMLib.weighting import gradient_mask
    from PDIQSMLib.weights import load_model

    chi, mask, field, lesion, g = lesion_case
    net, _ = load_model()
    passes: list = []
    mean, _ = inference.predict(net, field, mask, "cpu", geometry=g, reflections=2, passes=passes)
    one = inference.predict(net, field, mask, "cpu", geometry=g)[0]
    assert len(passes) == 2 and np.array_equal(passes[0][0], one)
    assert np.allclose(mean, (passes[0][0].astype(np.float64) + passes[1][0]) / 2, atol=1e-6)
    assert np.abs(passes[1][0] - one)[mask > 0].max() > 1e-4  # the mirrored pass is another map
    runs, seen = [], []
    network = inference.run_network

    def counted(*args, **kwargs):
        runs.append(1)
        return network(*args, **kwargs)

    class Stop(Exception):
        pass

    def stop(net_, volumes, config, *args, **kwargs):
        seen.append(volumes[0])
        raise Stop

    monkeypatch.setattr(inference, "run_network", counted)
    monkeypatch.setattr(vi, "finetune", stop)
    with pytest.raises(Stop):
        pipeline.reconstruct(field, mask, g, pipeline.Settings(method="pdi-vi1", device="cpu", vi_where="discrepant",
                                                                         noisy_regions="off", field_mean="keep"))
    assert len(runs) == 2  # PDI's two reflections, no third pass for the edges
    v = seen[0]
    x, y, z = v.size
    expected = gradient_mask(mask, one, g.voxel_size, PDI_EDGE_FRACTION)[(slice(None),) + v.box]
    assert np.array_equal(v.edges[:, :x, :y, :z].numpy(), expected)
    # and the map it will return outside the region, which its convergence test reads (VolumeData.keep), is PDI's
    assert v.kept is not None and np.allclose(v.kept[1][0, 0, :x, :y, :z].numpy(), mean[v.box], atol=1e-6)
    assert 0 < float(v.kept[0].sum()) < 0.5 * float(v.mask.sum())


def test_pdi_vi1s_default_lambda_follows_where_its_edges_come_from(lesion_case):
    """Through the pipeline: without a magnitude PDI-VI1 takes PDI's edges and lambda 1e-2, with one the magnitude's
    edges and 3e-3 (chosen for each on realistic brains); a given --lambda is kept either way."""
    from PDIQSMLib.pipeline import Settings, reconstruct

    chi, mask, field, lesion, g = lesion_case
    magnitude = np.where(lesion, 0.2, 1.0)
    for given, edges, lam in ((None, "PDI's map", VI_LAMBDA_PDI_EDGES), (magnitude, "magnitude", VI_LAMBDA)):
        info = reconstruct(field, mask, g, Settings(method="pdi-vi1", iterations=2, device="cpu"), magnitude=given).info
        assert info["edges"].startswith(edges) and info["lam"] == pytest.approx(lam)
    info = reconstruct(field, mask, g, Settings(method="pdi-vi1", iterations=2, device="cpu", lam=0.02)).info
    assert info["lam"] == pytest.approx(0.02)


def test_finetune_command_adapts_weights_on_a_set(tmp_path):
    """`pdiqsm finetune` on two lesion brains, then `reconstruct --weights` on a third never seen: the
    adapted weights fit the unseen field's data better and keep the unseen lesion's total susceptibility,
    but with the bundled model (51183 steps) they raise the brain's RMSE on these clean phantoms (39.3 -> 41.1 % at
    the default lambda 3e-3; session 22's weight average 39.8 -> 41.3 %; 44441 steps: 40.9 -> 43.0 %;
    27171 steps: 40.8 -> 47.3 %, 45.1 %
    at the former 1e-3; 19088 steps: 42.4 ->
    48.9 %; 10641 steps: 47.7 -> 47.8 %; the 2200-step model, which overestimated the lesion by 73 %: 58.3 -> 55.4 %), and they
    spread the lesion over its rim, as the README says: with a network this good, fine-tuning a set of clean
    fields mostly fits their noise. The RMSE bound only guards against a collapse. The noisy-region finder is off
    throughout: these fields have no noisy region, and it reads the field in and around an all-or-nothing 1.2 ppm
    lesion as noise (since session 28 the rim check runs around every region: 122-146 voxels marked in these three
    brains, 57-64 before, so the misfit over the whole mask no longer measures what was fitted: x0.75)."""
    from conftest import write_nifti

    from PDIQSMLib.cli import main
    from PDIQSMLib.pipeline import Settings, reconstruct
    from PDIQSMLib.weights import DEFAULT_WEIGHTS, sha256

    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    files = {}
    cases = {name: lesion_brain(seed, center, (56, 64, 40))
             for name, seed, center in (("a", 21, (30, 30, 20)), ("b", 22, (24, 36, 18)), ("c", 23, (32, 28, 22)))}
    for name, (chi, mask, field, _, _) in cases.items():
        files[name] = (write_nifti(tmp_path / f"{name}_field.nii.gz", field, affine),
                       write_nifti(tmp_path / f"{name}_mask.nii.gz", mask, affine))
    base_sha = sha256(DEFAULT_WEIGHTS)
    out = tmp_path / "adapted.safetensors"
    args = ["finetune", str(files["a"][0]), str(files["b"][0]), "--masks", str(files["a"][1]), str(files["b"][1]),
            "--out", str(out), "--iterations", "30", "--samples", "2", "--progress", "none", "--noisy-regions", "off"]

    # mismatched lists and an output that would replace the bundled weights: clear errors, nothing written
    assert main(args[:5] + args[6:]) == 2  # one mask for two fields
    assert main(args[:-10] + ["--out", str(DEFAULT_WEIGHTS)] + args[-8:]) == 2
    assert not out.exists() and sha256(DEFAULT_WEIGHTS) == base_sha
    with pytest.raises(SystemExit):  # adapted weights are not a map: no --vi-where to blend them by
        main(args + ["--vi-where", "discrepant"])

    assert main(args) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["base_weights_sha256"] == base_sha and manifest["iterations"] == 30
    # on a set the encoder stays frozen (default variant 'decoders'), so the base sigma is kept
    assert manifest["variant"] == "decoders" and manifest["sigma"].startswith("base network")
    assert sha256(out) == manifest["sha256"] and sha256(DEFAULT_WEIGHTS) == base_sha
    assert not list(tmp_path.glob("*.tmp"))

    # on the unseen brain: the adapted weights fit the data better, but raise the RMSE and spread the lesion
    chi, mask, field, lesion, g = cases["c"]
    base = reconstruct(field, mask, g, Settings(method="pdi", noisy_regions="off"))
    adapted = reconstruct(field, mask, g, Settings(method="pdi", weights=str(out), noisy_regions="off"))
    err = lambda m: abs(float(m[lesion].mean()) - 1.2)  # noqa: E731
    op = DipoleOperator(field.shape, g, 2.0)
    misfit = lambda m: float(((op.forward(torch.from_numpy(m)).numpy() - field)[mask] ** 2).sum())  # noqa: E731
    rmse = lambda m: np.linalg.norm(m[mask] - chi[mask]) / np.linalg.norm(chi[mask])  # noqa: E731
    # measured (decoders, 30 iterations, K = 2, lambda 3e-3; the bundled 51183-step model): misfit x0.42, RMSE
    # 39.31 -> 41.11 %, lesion total error 0.05 -> -0.10, lesion mean error 0.05 -> 0.16 ppm; the weight average of
    # session 22: x0.44, 39.79 -> 41.32 %, 0.04 -> -0.09, 0.03 -> 0.16 ppm; 44441 steps: misfit
    # x0.48, RMSE 40.88 -> 42.97 %, lesion total error 0.01 -> -0.11, lesion mean error 0.01 -> 0.17 ppm; 27171
    # steps: misfit x0.47, RMSE 40.78 -> 47.28 %,
    # lesion total error -0.00 -> -0.14, lesion mean error 0.06 -> 0.25 ppm (lambda 1e-3: x0.46, 45.09 %,
    # -0.16, 0.23; 19088 steps: x0.45, 42.45 -> 48.92 %; 10641 steps: misfit x0.41, RMSE 47.67 -> 47.78 %,
    # lesion total error 0.08 -> -0.11, lesion mean error 0.002 -> 0.236 ppm)
    assert misfit(adapted.mean) < 0.6 * misfit(base.mean)
    assert rmse(adapted.mean) < 1.25 * rmse(base.mean)
    assert abs(lesion_moment_error(base.mean, chi, mask, lesion)) < 0.2  # measured 0.05
    assert abs(lesion_moment_error(adapted.mean, chi, mask, lesion)) < 0.2  # measured -0.10
    assert err(adapted.mean) < 0.5  # the spread, bounded: a lesion mean error above half its 1.2 ppm fails
    assert np.all(np.isfinite(adapted.std)) and np.all(adapted.std[mask] > 0)
    # per-voxel variances (the default) are not part of the weights: the adapted sigma is the base's, pass by pass
    # (PDI's default two passes mix in the spread of their means, which the tuned mean decoder changes)
    one = lambda w: reconstruct(field, mask, g, Settings(method="pdi", weights=w, reflections=1,  # noqa: E731
                                                        noisy_regions="off")).std
    assert np.allclose(one(str(out)), one(None), rtol=1e-5, atol=1e-7)


def test_noise_level_estimate_on_noise_over_a_smooth_field_and_with_a_weight_map():
    from PDIQSMLib.vi import estimate_noise_level

    rng = np.random.default_rng(3)
    shape, g = (40, 40, 30), Geometry((1.0, 1.0, 2.0))
    mask = phantoms.sphere(shape, g.voxel_size, 18.0, 1.0) > 0
    x, y, z = np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij")
    smooth = 0.05 * (x**2 - y * z + 0.5 * z)  # a smooth background of 0.05 ppm, 50x the noise
    noise = 1e-3 * rng.standard_normal(shape)
    v = prepare(smooth + noise, mask, g, stride=2)
    assert abs(estimate_noise_level([v], "white") / 1e-3 - 1) < 0.05
    # noise std 1e-3 / W with W varying 4x across the volume: the level where W = 1 is 1e-3
    w = np.where(mask, 0.5 + 1.5 * x, 0.0)
    v = prepare(smooth + noise / np.maximum(w, 1e-6), mask, g, stride=2, weight=w)
    assert abs(estimate_noise_level([v], "white") / 1e-3 - 1) < 0.05


def small_weighted_volume(shape=(10, 12, 8), voxel=(1.0, 1.0, 2.0), seed=5):
    """A small volume with a non-uniform data weight, a mask with holes, a random field."""
    rng = np.random.default_rng(seed)
    g = Geometry(voxel)
    mask = rng.random(shape) > 0.2
    weight = np.where(mask, rng.uniform(0.2, 2.0, shape), 0.0).astype(np.float32)
    field = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return prepare(field, mask, g, stride=2, weight=weight), rng


def test_fidelity_diagonal_is_the_misfit_of_unit_noise_in_one_voxel():
    from PDIQSMLib.vi import fidelity_diagonal

    v, _ = small_weighted_volume()
    p = fidelity_diagonal(v.op, v.weight)
    for j in [(0, 0, 0), (3, 5, 2), (9, 11, 7), (5, 0, 4)]:
        e = torch.zeros_like(v.field)
        e[(0, 0) + j] = 1.0
        brute = float(((v.weight * v.op.forward(e)) ** 2).sum())  # ||W D e_j||^2 by applying D
        assert math.isclose(float(p[(0, 0) + j]), brute, rel_tol=1e-4)


def test_exact_expectation_equals_the_monte_carlo_average():
    """expected_kl (closed form) against the mean of kl_loss over many draws: fidelity and TV alike,
    with means that vary on the scale of sigma (where |N(a, v)| is far from |a|). Exact for the whole misfit (the
    default; blind to the harmonics, ``VolumeData.blind``, the variance term would drop by about k / N, which
    ``fidelity_diagonal`` leaves out)."""
    from PDIQSMLib.vi import expected_kl

    v, rng = small_weighted_volume()
    mean = torch.from_numpy((0.05 * rng.standard_normal(v.field.shape)).astype(np.float32))
    logvar = torch.from_numpy(np.log(rng.uniform(0.01, 0.06, v.field.shape) ** 2).astype(np.float32))
    exact = expected_kl(mean, logvar, v, lam=0.3, noise_level=0.05)
    misfit = v.misfit(mean * v.mask)  # what settle_variances passes in
    given = expected_kl(mean, logvar, v, lam=0.3, noise_level=0.05, misfit=misfit)
    assert all(math.isclose(float(given[k]), float(exact[k]), rel_tol=1e-6) for k in exact)
    gen = torch.Generator().manual_seed(0)
    draws = [kl_loss(mean, logvar, v, lam=0.3, samples=50, noise_level=0.05, generator=gen) for _ in range(40)]
    for term in ("entropy", "fidelity", "tv"):
        sampled = np.array([float(d[term]) for d in draws])
        error = sampled.std() / math.sqrt(len(sampled))  # standard error of the 2000-draw average
        assert abs(sampled.mean() - float(exact[term])) < 4 * error + 1e-6 * abs(float(exact[term])), term
    # and the means with sigma -> 0: the TV term becomes lambda ||M grad mu||_1 exactly
    tiny = torch.full_like(logvar, -60.0)
    sharp = expected_kl(mean, tiny, v, lam=0.3, noise_level=0.05)
    assert math.isclose(float(sharp["tv"]), float(kl_loss(mean, tiny, v, 0.3, 1, 0.05)["tv"]), rel_tol=1e-4)


def test_expected_abs_has_the_derivatives_of_its_closed_form():
    """ExpectedAbs (the TV term's E|N(a, v)|, summed with weights) against finite differences of itself in
    float64 (gradcheck), its value against the folded-normal mean written out, and its limits: v -> 0 gives
    |a| with d/da = sign(a), a = 0 gives sqrt(2v/pi)."""
    from PDIQSMLib.vi import ExpectedAbs

    gen = torch.Generator().manual_seed(3)
    a = (0.3 * torch.randn(3, 5, 4, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    v = (0.01 + 0.2 * torch.rand(3, 5, 4, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    w = (torch.rand(3, 5, 4, 6, generator=gen, dtype=torch.float64) > 0.3).double()
    assert torch.autograd.gradcheck(lambda a, v: ExpectedAbs.apply(a, v, w), (a, v))
    with torch.no_grad():
        root = torch.sqrt(2 * v)
        written = w * (root / math.sqrt(math.pi) * torch.exp(-a * a / (2 * v)) + a * torch.erf(a / root))
        assert math.isclose(float(ExpectedAbs.apply(a, v, w)), float(written.sum()), rel_tol=1e-12)
    tiny = torch.full_like(v, 1e-20, requires_grad=True)
    sharp = ExpectedAbs.apply(a, tiny, w)
    sharp.backward()
    assert math.isclose(float(sharp.detach()), float((w * a.detach().abs()).sum()), rel_tol=1e-9)
    assert torch.equal(a.grad, w * torch.sign(a.detach()))
    zero = torch.zeros_like(a)
    assert math.isclose(float(ExpectedAbs.apply(zero, v.detach(), w)),
                        float((w * torch.sqrt(2 * v.detach() / math.pi)).sum()), rel_tol=1e-12)


def test_voxel_variances_reach_the_mean_field_optimum_with_a_flat_prior():
    """With lambda = 0 the KL's optimum over sigma_j is s / sqrt(P_j), P_j = ||W D e_j||^2, whatever
    the mean: the per-voxel variances ('voxel') must get there; the network's log variance cannot
    in general (one map for all voxels from shared weights)."""
    from PDIQSMLib.network import PRESETS, PDINet
    from PDIQSMLib.vi import fidelity_diagonal

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    s = 0.01
    config = VIConfig(lam=0.0, iterations=150, estimator="exact", variance="voxel", noise_level=s, lr=1e-3)
    result = finetune(net, [v], config)
    sigma = torch.exp(0.5 * result.log_variances[0])[0, 0]
    optimum = s / fidelity_diagonal(v.op, v.weight)[0, 0].sqrt()
    inside = v.mask[0, 0] > 0
    ratio = (sigma / optimum)[inside]
    assert float((ratio - 1).abs().max()) < 0.03
    # and it is the variance used by predict_volume
    _, std = predict_volume(result.net, v, result.log_variances[0])
    assert np.allclose(std[v.full_mask], sigma.numpy()[v.full_mask], rtol=1e-5)


def test_the_sigma_noise_level_reads_the_non_dipolar_part_that_white_noise_misses():
    """A field = dipole field + a correlated non-dipolar part (4e-3 ppm, 1-voxel blur) + white noise
    (5e-4 ppm): the part no map explains has std 3.7e-3. The cone estimate (the default for the sigma
    reported) reads it; the second differences (the default while the mean is tuned) only the white noise. Measured (seed 0): cone 7.0e-3 (1.9x: the truncated
    dipole field of a small volume leaks into the cone), white 5.3e-4."""
    from PDIQSMLib import fieldterms
    from PDIQSMLib.vi import estimate_noise_level

    rng = np.random.default_rng(0)
    shape, g = (48, 48, 32), Geometry((1.0, 1.0, 2.0))
    mask = phantoms.sphere(shape, g.voxel_size, 20.0, 1.0) > 0
    chi = np.where(mask, 0.05 * fieldterms.correlated_noise(shape, rng, 2.0), 0).astype(np.float32)
    extra = 4e-3 * fieldterms.correlated_noise(shape, rng, 1.0) + 5e-4 * rng.standard_normal(shape)
    v = prepare(np.where(mask, field_of(chi, mask, g, 2.0) + extra, 0), mask, g, stride=2)
    true = float(extra[mask].std())
    assert VIConfig().sigma_estimate == "cone" and VIConfig().noise_estimate == "white"
    assert 0.8 * true < estimate_noise_level([v], "cone") < 2.5 * true  # measured 1.87x
    assert estimate_noise_level([v], "white") < 0.2 * true  # measured 0.14x
    with pytest.raises(InputError, match="unknown estimate"):
        estimate_noise_level([v], "laplacian")
    # fine-tuning weighs the data by the white level and settles sigma for the cone's: s_cone / sqrt(P_j)
    from PDIQSMLib.network import PRESETS, PDINet
    from PDIQSMLib.vi import fidelity_diagonal

    torch.manual_seed(0)
    result = finetune(PDINet(PRESETS["tiny"]).eval(), [v], VIConfig(lam=0.0, iterations=1, lr=0.0,
                                                                   variance_iterations=200))
    assert result.noise_level == estimate_noise_level([v], "white")
    assert result.sigma_noise_level == estimate_noise_level([v], "cone")
    sigma = torch.exp(0.5 * result.log_variances[0])[0, 0]
    optimum = result.sigma_noise_level / fidelity_diagonal(v.op, v.weight)[0, 0].sqrt()
    assert float((sigma / optimum - 1)[v.mask[0, 0] > 0].abs().median()) < 0.05


def test_finetuning_stops_when_the_mean_stops_moving_and_then_settles_the_variances():
    """With a learning rate of 0 the mean never moves: the default (tol 0.01) stops at the first
    window's end (iteration 11) where tol 0 runs every iteration; either way the per-voxel sigma is
    then set for the mean reached, at the flat prior's optimum s / sqrt(P_j)."""
    from PDIQSMLib.network import PRESETS, PDINet
    from PDIQSMLib.vi import CHANGE_WINDOW, fidelity_diagonal

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    s = 0.01
    # fp32 throughout: under 'auto' a switch to bf16 after the timed iterations moves the map by bf16's rounding
    stopped = finetune(net, [v], VIConfig(lam=0.0, iterations=40, estimator="exact", noise_level=s, lr=0.0,
                                          precision="fp32"))
    assert len(stopped.history) == CHANGE_WINDOW + 1 and stopped.history[-1]["change"] == 0.0
    full = finetune(net, [v], VIConfig(lam=0.0, iterations=40, estimator="exact", noise_level=s, lr=0.0, tol=0.0,
                                       precision="fp32"))
    assert len(full.history) == 40
    optimum = s / fidelity_diagonal(v.op, v.weight)[0, 0].sqrt()
    inside = v.mask[0, 0] > 0
    for result in (stopped, full):
        ratio = (torch.exp(0.5 * result.log_variances[0])[0, 0] / optimum)[inside]
        assert float((ratio - 1).abs().max()) < 0.03
    # a moving mean is not taken for converged
    moving = finetune(net, [v], VIConfig(lam=0.0, iterations=25, estimator="exact", noise_level=s, lr=1e-2))
    assert len(moving.history) == 25 and moving.history[10]["change"] > 0.01


def test_where_the_map_is_kept_in_part_fine_tuning_stops_when_the_map_returned_stops_moving():
    """With the map returned blend * mu + (1 - blend) * base (``VolumeData.keep``, --vi-where discrepant), the
    convergence test measures that map: blend 1 everywhere measures the fine-tuned map as before (the same changes to
    the bit), blend 0 returns the base, which never moves (stops at the first window's end while mu still moves),
    and a blend over half the mask measures a change between the two. ``in_box`` crops and pads as the field is."""
    from PDIQSMLib.network import PRESETS, PDINet
    from PDIQSMLib.vi import CHANGE_WINDOW, MapChange

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, rng = small_weighted_volume(shape=(12, 12, 8))
    full = rng.standard_normal(v.full_mask.shape)
    x, y, z = v.size
    boxed = v.in_box(full)
    assert boxed.shape == v.field.shape and np.allclose(boxed[0, 0, :x, :y, :z].numpy(), full[v.box].astype(np.float32))
    assert float(boxed[0, 0, x:].abs().sum() + boxed[0, 0, :, y:].abs().sum() + boxed[0, 0, :, :, z:].abs().sum()) == 0
    base = predict_volume(net, v)[0]
    config = VIConfig(lam=0.0, iterations=25, estimator="exact", noise_level=0.01, lr=1e-2, precision="fp32")
    changes = {}
    for name, blend in (("plain", None), ("ones", np.ones(full.shape)), ("zeros", np.zeros(full.shape))):
        w = copy.copy(v)
        if blend is not None:
            w.keep(blend, base)
        history = finetune(net, [w], config).history
        changes[name] = [r["change"] for r in history if "change" in r]
        if name == "zeros":
            assert len(history) == CHANGE_WINDOW + 1 and changes[name] == [0.0]
        else:
            assert len(history) == 25 and len(changes[name]) == 2
    assert changes["ones"] == changes["plain"] and changes["plain"][0] > 0.01
    # by hand: a blend of 1 on the first half of the box's rows, a mean moved inside it or outside it only
    half = (np.arange(full.shape[0]) < full.shape[0] // 2)[:, None, None] * np.ones(full.shape)
    w = copy.copy(v)
    w.keep(half, base)
    inside, region = v.mask > 0, w.kept[0] > 0.5
    first = torch.from_numpy(rng.standard_normal(v.field.shape).astype(np.float32))
    returned = [half[v.box] * m[0, 0, :x, :y, :z].numpy() + (1 - half[v.box]) * base[v.box]
                for m in (first, first + 0.3)]
    by_hand = np.linalg.norm((returned[1] - returned[0])[v.full_mask[v.box]]) / np.linalg.norm(
        returned[1][v.full_mask[v.box]])
    for where, expected in ((~region, 0.0), (region, by_hand)):
        change = MapChange([w], 0.01)
        step = torch.where(where & inside, 0.3, 0.0)
        assert change.update(1, 0, first) is None and change.update(11, 0, first + step) == pytest.approx(expected)
        assert change.converged() == (expected == 0.0)
    assert by_hand > 0.01


def test_bf16_autocast_covers_the_network_only_and_fine_tunes_as_fp32_does():
    """Under bf16 autocast (``precision``) only the network's passes are bf16: its mean reaches the dipole
    model and the loss in fp32, so the first loss matches fp32's to bf16's rounding of the map (measured
    3e-6 relative), not to fp32's (it differs, so autocast was on); after 10 steps, which move the map by
    its own size, the maps differ by 2 % (bound 6 %)."""
    from PDIQSMLib.network import PRESETS, PDINet

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    config = VIConfig(lam=VI_LAMBDA, iterations=10, estimator="exact", noise_level=0.01, tol=0.0)
    runs = {p: finetune(net, [v], replace(config, precision=p)) for p in ("fp32", "bf16")}
    first = [runs[p].history[0]["loss"] for p in ("fp32", "bf16")]
    assert first[0] != first[1] and abs(first[1] - first[0]) < 1e-4 * abs(first[0])
    start = finetune(net, [v], replace(config, iterations=1, lr=0.0)).predict(v)[0]
    fp32, bf16 = (runs[p].predict(v)[0][v.full_mask] for p in ("fp32", "bf16"))
    assert np.linalg.norm(fp32 - start[v.full_mask]) > 0.5 * np.linalg.norm(fp32)
    assert np.linalg.norm(bf16 - fp32) < 0.06 * np.linalg.norm(fp32)


@pytest.mark.parametrize("bf16_seconds, chosen", [(0.6, True), (0.95, False), (1.3, False)])
def test_auto_precision_times_both_on_a_cpu_with_bf16_and_keeps_bf16_only_if_clearly_faster(
        monkeypatch, bf16_seconds, chosen):
    """With two volumes cycled: two cycles in fp32, two in bf16 (the first of each warms up), then the faster,
    bf16 only if its second cycle took under 0.9 of fp32's."""
    from PDIQSMLib import vi

    monkeypatch.setattr(vi, "use_bf16", lambda precision, device: precision != "fp32")  # a CPU with bf16
    trial = vi.PrecisionTrial(VIConfig(iterations=20), "cpu", volumes=2)
    used = []
    for it in range(1, 12):
        used.append(trial.before(it))
        trial.after(it, {False: 1.0, True: bf16_seconds}[used[-1]] * (5.0 if it in (1, 5) else 1.0))
    assert used == [False] * 4 + [True] * 4 + [chosen] * 3
    assert trial.summary() == f"{'bf16' if chosen else 'fp32'} (timed: an iteration 1.00 s in fp32, {bf16_seconds:.2f} s in bf16)"
    # no trial where the precision is given, on a GPU, on a CPU without bf16, or with too few iterations
    for config, device, hardware in ((VIConfig(precision="fp32"), "cpu", True), (VIConfig(precision="bf16"), "cpu", True),
                                     (VIConfig(), "cuda", True), (VIConfig(), "cpu", False),
                                     (VIConfig(iterations=7), "cpu", True)):
        monkeypatch.setattr(vi, "use_bf16", lambda precision, device: precision == "bf16" or hardware)
        trial = vi.PrecisionTrial(config, device, volumes=2)
        assert len({trial.before(it) for it in range(1, 9)}) == 1 and "timed" not in trial.summary()


def test_auto_precision_runs_the_trial_inside_finetuning(monkeypatch):
    """The trial's iterations really change the network's precision: iterations 1-2 give fp32's losses exactly,
    3-4 bf16's rounding (not fp32's), and the run says what it chose and timed."""
    from PDIQSMLib import vi
    from PDIQSMLib.network import PRESETS, PDINet

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    config = VIConfig(lam=VI_LAMBDA, iterations=6, estimator="exact", noise_level=0.01, tol=0.0)
    fp32 = [r["loss"] for r in finetune(net, [v], replace(config, precision="fp32")).history]
    monkeypatch.setattr(vi, "use_bf16", lambda precision, device: precision != "fp32")
    auto = finetune(net, [v], replace(config, precision="auto"))
    losses = [r["loss"] for r in auto.history]
    assert losses[:2] == fp32[:2] and losses[2] != fp32[2] and abs(losses[2] - fp32[2]) < 1e-3 * abs(fp32[2])
    assert auto.precision.split(" ")[0] in ("fp32", "bf16") and "s in bf16)" in auto.precision


def test_the_tv_weight_schedule_falls_geometrically_from_its_start_to_lambda():
    from PDIQSMLib.vi import scheduled

    config = VIConfig(lam=1e-2, tv_start=8.0, tv_iterations=3)
    assert [scheduled(config, it).lam for it in (1, 2, 3, 4, 50)] == pytest.approx([8e-2, 4e-2, 2e-2, 1e-2, 1e-2])
    assert scheduled(VIConfig(lam=1e-2), 1).lam == 1e-2
    with pytest.raises(InputError, match="tv_start"):
        VIConfig(tv_start=0.5).check()


def test_adams_step_rises_over_the_warm_up_and_falls_along_a_cosine_to_its_final_value():
    from PDIQSMLib.vi import step_size

    config = VIConfig(lr=1e-3, iterations=5, lr_final=1e-4)
    assert [step_size(config, it) for it in range(1, 6)] == pytest.approx(
        [1e-3, 1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, 5.5e-4, 1e-4 + 9e-4 * (1 - math.cos(math.pi / 4)) / 2, 1e-4])
    assert [step_size(VIConfig(lr=1e-3, warmup=4), it) for it in (1, 2, 4, 9)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    assert step_size(VIConfig(lr=1e-3), 7) == 1e-3


def test_vis_adam_takes_torchs_adam_steps_with_changing_steps_and_parameters_without_gradients():
    """vi.Adam (written out to spare torch.optim's import of torch._dynamo) against torch.optim.Adam: two groups, the
    first group's step changed every iteration, one parameter left without a gradient every third iteration (torch
    skips it and does not count the step). The paths agree to float rounding."""
    from PDIQSMLib.vi import Adam

    torch.manual_seed(0)
    ours = [torch.randn(6, 5, requires_grad=True), torch.randn(9, requires_grad=True), torch.randn(4, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    groups = {id(ours): [{"params": ours[:2], "lr": 1e-2}, {"params": ours[2:], "lr": 0.1}],
              id(theirs): [{"params": theirs[:2], "lr": 1e-2}, {"params": theirs[2:], "lr": 0.1}]}
    optimisers = [(ours, Adam(groups[id(ours)])), (theirs, torch.optim.Adam(groups[id(theirs)]))]
    for k in range(40):
        for params, opt in optimisers:
            groups[id(params)][0]["lr"] = 1e-2 * (1 + k % 3)
            opt.zero_grad()
            loss = (params[0] ** 3).sum() + params[1].sin().sum()
            if k % 3:
                loss = loss + (params[2] ** 2).sum()
            loss.backward()
            opt.step()
    torch.manual_seed(0)
    assert (ours[0] - torch.randn(6, 5)).abs().max() > 0.1  # the parameters moved
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert Adam(groups[id(ours)]).state == {}  # a new optimiser starts afresh


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fixed_precision_gives_bit_identical_maps_run_after_run(precision):
    """What the README promises on the CPU (with 'auto', the timed choice may differ between runs)."""
    from PDIQSMLib.network import PRESETS, PDINet

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    config = VIConfig(lam=VI_LAMBDA, iterations=5, noise_level=0.01, tol=0.0, precision=precision)
    (m1, s1), (m2, s2) = (finetune(net, [v], config).predict(v) for _ in range(2))
    assert np.array_equal(m1, m2) and np.array_equal(s1, s2) and np.abs(m1).max() > 0


def test_bf16_passes_read_the_cached_features_cast_once_and_fine_tune_as_before(monkeypatch):
    """The decoders' bf16 passes read a bf16 copy of the encoder's cached features (made once), not the fp32 cache
    that autocast would cast at every pass: the losses agree with the per-pass casts to float rounding."""
    from PDIQSMLib import vi
    from PDIQSMLib.network import PRESETS, PDINet

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    config = VIConfig(lam=VI_LAMBDA, iterations=4, estimator="exact", noise_level=0.01, tol=0.0, precision="bf16",
                      variant="decoders")
    model = vi.Model(copy.deepcopy(net), "decoders", [v], "voxel", bf16=True)
    bottom, skips = model._cached(0)
    assert bottom.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in skips)
    assert model._cached(0)[0] is bottom and model.cache[0][0].dtype == torch.float32
    once = [r["loss"] for r in finetune(net, [v], config).history]
    monkeypatch.setattr(vi.Model, "_cached", lambda self, index: self.cache[index])
    monkeypatch.setattr(vi.Model, "bf16_only", lambda self: None)  # keep the fp32 cache this run reads
    every_pass = [r["loss"] for r in finetune(net, [v], config).history]
    assert np.allclose(once, every_pass, rtol=1e-5, atol=0)


def test_once_bf16_is_final_the_fp32_feature_cache_is_freed_and_the_passes_are_unchanged(monkeypatch):
    """After ``bf16_only`` a volume's cached features live in bf16 alone: the bf16 passes give the same maps, an
    fp32 pass is refused instead of running on nothing, and fine-tuning frees the fp32 copy only when bf16 is final."""
    from PDIQSMLib import vi
    from PDIQSMLib.network import PRESETS, PDINet

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    model = vi.Model(copy.deepcopy(net), "decoders", [v, v], "voxel", bf16=True)
    with torch.no_grad():
        before = model(1, v)[0]
        model.bf16_only()
        after = model(1, v)[0]
    assert model.cache == [None, None] and all(model.cache_bf16[i][0].dtype == torch.bfloat16 for i in (0, 1))
    assert torch.equal(before, after) and before.abs().max() > 0
    model.bf16 = False
    with pytest.raises(RuntimeError, match="freed"):
        model(0, v)
    freed: list[bool] = []
    free = vi.Model.bf16_only
    monkeypatch.setattr(vi.Model, "bf16_only", lambda self: (freed.append(self.bf16), free(self)))
    for precision in ("fp32", "bf16"):
        config = VIConfig(lam=VI_LAMBDA, iterations=3, noise_level=0.01, tol=0.0, precision=precision,
                          variant="decoders")
        finetune(net, [v], config)
        assert freed == ([] if precision == "fp32" else [True] * 3)


def test_learning_the_noise_level_from_the_elbo_is_degenerate_with_voxel_variances():
    """Why PDI-VI reads s from the field instead of learning it as the ELBO's maximiser: with a flat prior
    and each voxel's sigma at its optimum s^2 / P_j, the KL plus the likelihood's normaliser N log s is
    ||W (D mu - b)||^2 / 2 s^2 + a constant, so it falls without end as s grows (no maximiser)."""
    from PDIQSMLib.vi import expected_kl, fidelity_diagonal

    v, rng = small_weighted_volume()
    mean = torch.from_numpy((0.05 * rng.standard_normal(v.field.shape)).astype(np.float32))
    inside = v.mask > 0
    n = int(inside.sum())
    p = fidelity_diagonal(v.op, v.weight).double()
    residual = float(v.misfit(mean * v.mask))  # ||P W (D mu - b)||^2, P the projection off the harmonics
    totals, rests = [], []
    for s in (0.005, 0.01, 0.02, 0.04, 0.08):
        logvar = torch.where(inside, torch.log(s**2 / p), torch.zeros_like(p)).float()
        total = float(expected_kl(mean, logvar, v, lam=0.0, noise_level=s)["loss"]) + n * math.log(s)
        totals.append(total)
        rests.append(total - residual / (2 * s**2))
    assert all(a > b for a, b in zip(totals, totals[1:]))
    assert max(rests) - min(rests) < 0.05  # measured 1.2e-3 (float32), where the terms are 1e2-1e4


def test_a_run_records_k_only_when_it_draws_samples():
    """The exact expectation (the default) reads no K: the run record leaves it out, as it does every
    setting a method does not read; with --vi-estimator mc it is there."""
    from PDIQSMLib.pipeline import Settings

    assert "samples" not in Settings(method="pdi-vi1").applicable()
    assert Settings(method="pdi-vi2", vi_estimator="mc", samples=3).applicable()["samples"] == 3


def test_pdi_vi1_sigma_is_the_fields_own_spread_not_narrowed_by_its_tv_weight():
    """PDI-VI1's TV weight guards the mean against fitting the non-dipolar field; the sigma reported is
    settled without it, at the flat prior's optimum s / sqrt(P_j) for the mean reached (lr 0: PDI's map),
    whatever lambda. Settled with the TV term (``sigma_tv``) the same voxels come out narrower, as the TV
    term's pull towards 2 s^2 / (lambda c) says (measured on realistic brain 31002: 2-sigma coverage 0.99
    without it, 0.36 with it at lambda 3e-3)."""
    from PDIQSMLib.network import PRESETS, PDINet
    from PDIQSMLib.vi import fidelity_diagonal

    torch.manual_seed(0)
    net = PDINet(PRESETS["tiny"]).eval()
    v, _ = small_weighted_volume(shape=(12, 12, 8))
    s, inside = 0.01, v.mask[0, 0] > 0
    optimum = s / fidelity_diagonal(v.op, v.weight)[0, 0].sqrt()
    sigma = {}
    for lam in (0.0, VI_LAMBDA, 0.3):
        for tv in (False, True):
            config = VIConfig(lam=lam, iterations=1, estimator="exact", noise_level=s, lr=0.0, variance_iterations=200,
                              sigma_tv=tv)
            sigma[lam, tv] = torch.exp(0.5 * finetune(net, [v], config).log_variances[0])[0, 0][inside]
    for lam in (0.0, VI_LAMBDA, 0.3):
        assert float((sigma[lam, False] / optimum[inside] - 1).abs().max()) < 0.03
    # with lambda 0 the Adam steps of sigma_tv reach the closed form set without it
    assert torch.allclose(sigma[0.0, True], sigma[0.0, False], rtol=1e-3)
    assert float((sigma[0.3, True] / sigma[0.3, False]).median()) < 0.9


def test_the_qsmci_method_folder_documents_pdi_vi1s_default_lambda():
    """qsmci/pdi-vi1/algorithm.yml shows QSM-CI users the default a run without --set gets (QSM-CI passes no
    magnitude, so PDI-VI1's edges come from PDI's map, with its own default lambda)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "qsmci" / "pdi-vi1" / "algorithm.yml").read_text()
    default = re.search(r"- name: lambda\s*\n\s*default: ([0-9.eE+-]+)", text)
    assert default and float(default.group(1)) == pytest.approx(VI_LAMBDA_PDI_EDGES)


def test_the_qsmci_medi_folder_documents_the_automatic_lambda_its_runs_get():
    """A QSM-CI run without --set passes no --lambda, so MEDI reads its lambda from the field; the yml says so
    (it said 0.001, the old fixed default), and --set lambda=auto is passed through as no override."""
    import re
    from pathlib import Path

    from PDIQSMLib.pipeline import Settings

    root = Path(__file__).resolve().parents[1] / "qsmci"
    default = re.search(r"- name: lambda\s*\n\s*default: (\S+)", (root / "medi" / "algorithm.yml").read_text())
    assert default and default.group(1) == "auto" and Settings(method="medi").lam is None
    assert '"$QSMCI_SET_LAMBDA" != auto' in (root / "common" / "run-dipole.sh").read_text()


def test_the_data_term_is_blind_to_low_order_harmonics_only_when_asked(lesion_case, monkeypatch):
    """--vi-harmonics ignore: ``prepare`` gives the misfit an orthonormal basis of W h (h the 9 solid harmonics up to
    degree 2 in the mask), and the misfit is then the same for the field plus any such harmonic (what sources outside
    the brain make), while a non-harmonic change still counts; keep (the default) has none, and the harmonic raises
    the misfit. Through the pipeline the choice reaches ``prepare`` and the run record."""
    from PDIQSMLib import pipeline, vi
    from PDIQSMLib.weighting import harmonic_basis

    v, rng = small_weighted_volume()
    mask = (v.mask[0, 0] > 0).numpy()[: v.size[0], : v.size[1], : v.size[2]]
    weight = v.weight[0, 0].numpy()[: v.size[0], : v.size[1], : v.size[2]]
    field = v.field[0, 0].numpy()[: v.size[0], : v.size[1], : v.size[2]]
    h = np.zeros(mask.shape, np.float32)
    h[mask] = harmonic_basis(mask, v.geometry.voxel_size) @ rng.normal(0.0, 0.01, 9)
    chi = torch.from_numpy((0.05 * rng.standard_normal(v.field.shape)).astype(np.float32)) * v.mask
    for degree in (2, -1):
        a, b = (prepare(f, mask, v.geometry, 2, weight, blind_degree=degree) for f in (field, field + h))
        if degree < 0:
            assert a.blind is None and float(b.misfit(chi)) > 1.05 * float(a.misfit(chi))
            continue
        assert a.blind.shape == (9, mask.sum())
        assert torch.allclose(a.blind @ a.blind.T, torch.eye(9), atol=1e-5)
        assert math.isclose(float(b.misfit(chi)), float(a.misfit(chi)), rel_tol=1e-4)
        assert float(a.misfit(chi * 1.1)) > 1.01 * float(a.misfit(chi))
    chi_l, mask_l, field_l, _, g = lesion_case
    seen = []

    class Stop(Exception):
        pass

    def stop(*args, blind_degree=-1, **kwargs):
        seen.append(blind_degree)
        raise Stop

    monkeypatch.setattr(vi, "prepare", stop)
    for choice in ("ignore", "keep"):
        with pytest.raises(Stop):
            pipeline.reconstruct(field_l, mask_l, g, pipeline.Settings(method="pdi-vi1", device="cpu",
                                                                       vi_where="everywhere", vi_harmonics=choice))
    assert seen == [vi.BLIND_DEGREE, -1]
    assert pipeline.Settings(method="pdi-vi1", vi_harmonics="ignore").applicable()["vi_harmonics"] == "ignore"
    with pytest.raises(InputError, match="--vi-harmonics"):
        pipeline.Settings(method="pdi-vi1", vi_harmonics="drop").check()
