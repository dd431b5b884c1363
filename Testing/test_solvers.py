"""MAP baselines recover known phantoms from simulated fields.

Bounds were measured on this phantom (brain seed 7, 64x72x48, 1.5x1.5x2 mm, oblique B0, noiseless
field simulated with 2x padding): TKD 40.0 %, Tikhonov (lambda 1e-3) 36.0 %, MEDI (default lambda
1e-3) 37.1 % RMSE. Each bound sits between the solver's value and TKD's.
"""

import numpy as np
import pytest
import torch

from PDIQSMLib import metrics, phantoms, solvers
from PDIQSMLib.geometry import Geometry
from PDIQSMLib.simulation import field_of


@pytest.fixture(scope="module")
def brain_case():
    vs = (1.5, 1.5, 2.0)
    g = Geometry(vs, (0.1, 0.05, 0.99))
    ph = phantoms.brain((64, 72, 48), vs, np.random.default_rng(7))
    field = torch.from_numpy(field_of(ph.chi, ph.mask, g, 2.0))
    return ph, field, torch.from_numpy(ph.mask.astype(np.float32)), g


@pytest.fixture(scope="module")
def tkd_rmse(brain_case):
    ph, b, m, g = brain_case
    return metrics.nrmse(solvers.tkd(b, m, g).numpy(), ph.chi, ph.mask)


def test_tkd_is_a_reasonable_reference(brain_case, tkd_rmse):
    assert 30 < tkd_rmse < 45


def test_tikhonov_beats_tkd(brain_case, tkd_rmse):
    ph, b, m, g = brain_case
    rmse = metrics.nrmse(solvers.tikhonov(b, m, g, 1e-3).numpy(), ph.chi, ph.mask)
    assert rmse < 38.0 < tkd_rmse


def test_medi_beats_tkd_and_reports_progress(brain_case, tkd_rmse):
    ph, b, m, g = brain_case
    calls = []
    chi = solvers.medi(b, m, g, progress=lambda i, n: calls.append((i, n)))
    rmse = metrics.nrmse(chi.numpy(), ph.chi, ph.mask)
    assert rmse < 39.0 < tkd_rmse
    assert calls[0][0] == 1 and calls[-1][0] == calls[-1][1]  # counted from 1, ends complete
    assert len(calls) < solvers.MEDI_MAX_ITER  # stopped on the relative-change rule
    assert torch.all(chi[m == 0] == 0)


def test_outputs_are_zero_outside_mask_and_finite(brain_case):
    ph, b, m, g = brain_case
    for chi in (solvers.tkd(b, m, g), solvers.tikhonov(b, m, g)):
        assert torch.all(torch.isfinite(chi)) and torch.all(chi[m == 0] == 0)


def test_tkd_bias_correction_restores_sphere_susceptibility():
    # measured: TKD's mean inside a 0.3 ppm sphere is 0.237 (21 % low); corrected 0.311
    shape, g = (48, 48, 48), Geometry((1.0, 1.0, 1.0))
    chi = phantoms.sphere(shape, g.voxel_size, 6, 0.3)
    mask = phantoms.sphere(shape, g.voxel_size, 20, 1) > 0
    b = torch.from_numpy(field_of(chi, mask, g, 2.0))
    m = torch.from_numpy(mask.astype(np.float32))
    inside = chi > 0
    plain = float(solvers.tkd(b, m, g, pad=1.0).numpy()[inside].mean())
    fixed = float(solvers.tkd(b, m, g, pad=1.0, correct_bias=True).numpy()[inside].mean())
    assert plain < 0.26 and abs(fixed - 0.3) < abs(plain - 0.3)


def test_medi_weight_ignores_corrupted_voxels():
    # a block of garbage field with zero data weight must not change the result elsewhere much
    shape, g = (40, 40, 32), Geometry((1.0, 1.0, 1.0))
    chi = phantoms.sphere(shape, g.voxel_size, 5, 0.2)
    mask = phantoms.sphere(shape, g.voxel_size, 16, 1) > 0
    b = field_of(chi, mask, g, 2.0)
    m = torch.from_numpy(mask.astype(np.float32))
    bad = b.copy()
    bad[4:10, 14:26, 10:22] += 0.5 * mask[4:10, 14:26, 10:22]
    w = torch.from_numpy(mask.astype(np.float32))
    w[4:10, 14:26, 10:22] = 0
    clean = solvers.medi(torch.from_numpy(b), m, g)
    weighted = solvers.medi(torch.from_numpy(bad), m, g, weight=w)
    unweighted = solvers.medi(torch.from_numpy(bad), m, g)
    assert float((weighted - clean).norm()) < 0.2 * float((unweighted - clean).norm())


def test_the_automatic_lambda_follows_the_noise_and_lands_near_the_best():
    """On a realistic field (the kind it was fitted for), the default Tikhonov lambda (c s^2, s read off the
    field's cone) costs at most a few points of NRMSE against the best lambda of a fine grid, with and
    without 1e-2 ppm more noise, and grows with the noise. (The L-curve corner, solvers.tikhonov_lcurve,
    fails such a check: on a procedural brain with 1e-3 and 1e-2 ppm noise its corners were 4e-5 and
    1.6e-5, moving the wrong way; it is kept for comparison only. On clean procedural fields, the
    automatic lambda over-regularises: 51 % against a best 38 % at 1e-3 ppm, a known limit.)"""
    from PDIQSMLib import anatomy
    from PDIQSMLib.fieldstats import cone_noise
    from PDIQSMLib.simulation import REALISTIC, realistic_sample

    if not anatomy.available():
        pytest.skip("needs nilearn's MNI152 templates")
    rng = np.random.default_rng(777)  # not a seed the constant c was fitted on (auto_lambda.py: 30000+)
    brain = anatomy.anatomical_brain(rng, (1.5, 1.5, 2.0), (96, 112, 64))
    sample = realistic_sample(brain.chi, brain.mask, Geometry((1.5, 1.5, 2.0)), rng, REALISTIC, brain.wm)
    g, mask = sample.geometry, sample.mask
    m, b = torch.from_numpy(mask.astype(np.float32)), torch.from_numpy(sample.field)
    grid = np.logspace(-4, 0, 17)
    chosen = []
    for sigma in (0.0, 1e-2):
        noisy = b + torch.from_numpy(rng.normal(0, sigma, b.shape).astype(np.float32)) * m if sigma else b
        lam = solvers.auto_lambda("tikhonov", cone_noise(noisy.numpy(), mask, g))
        err = lambda x: metrics.nrmse_demeaned(solvers.tikhonov(noisy, m, g, x).numpy(), sample.chi, mask)  # noqa: E731
        best = min(err(x) for x in grid)
        print(f"noise {sigma:g}: auto lambda {lam:.3g}, NRMSE {err(lam):.1f} (grid best {best:.1f})")
        assert err(lam) < best + 4.0
        chosen.append(lam)
    assert chosen[1] > 3 * chosen[0]  # measured 4.5x: the realistic terms are already there without the added noise


def test_bad_parameters():
    b = torch.zeros(8, 8, 8)
    m = torch.ones(8, 8, 8)
    g = Geometry()
    with pytest.raises(ValueError):
        solvers.tkd(b, m, g, threshold=0.0)
    with pytest.raises(ValueError):
        solvers.tikhonov(b, m, g, lam=0.0)
    with pytest.raises(ValueError):
        solvers.medi(b, m, g, lam=-1.0)
    with pytest.raises(ValueError):
        solvers.medi(b, m, g, max_iter=0)


def test_weighted_tikhonov_equals_the_closed_form_for_uniform_weight_and_discounts_noisy_voxels(brain_case):
    ph, b, m, g = brain_case
    closed = solvers.tikhonov(b, m, g)
    uniform = solvers.tikhonov_weighted(b, m, g, torch.ones_like(m))
    assert float((uniform - closed).norm() / closed.norm()) < 1e-5
    # a region of very noisy field (100x), as inside a hemorrhage; W = 1 / noise std (mean 1)
    rng = np.random.default_rng(0)
    noisy = torch.from_numpy(phantoms.sphere(ph.chi.shape, g.voxel_size, 10.0, 1.0, center=(30, 36, 24)) > 0) & (m > 0)
    std = torch.where(noisy, 0.1, 1e-3)
    field = (b + std * torch.from_numpy(rng.standard_normal(b.shape).astype(np.float32))) * m
    w = torch.where(m > 0, 1.0 / std, 0.0)
    w = w / w[m > 0].mean()
    rmse = lambda x: metrics.nrmse(x.numpy(), ph.chi, ph.mask)  # noqa: E731
    plain, weighted = rmse(solvers.tikhonov(field, m, g)), rmse(solvers.tikhonov_weighted(field, m, g, w))
    assert weighted < 0.5 * plain, (plain, weighted)  # measured: 102.9 % -> 41.3 %
