"""Metrics on small cases computed by hand."""

import math

import numpy as np
import pytest

from PDIQSMLib import metrics


@pytest.fixture
def pair():
    truth = np.zeros((3, 3, 3))
    truth[1, 1, :] = [1.0, 2.0, 3.0]
    recon = truth.copy()
    recon[1, 1, :] = [1.0, 2.0, 4.0]
    mask = truth != 0
    return recon, truth, mask


def test_nrmse_by_hand(pair):
    recon, truth, mask = pair
    assert math.isclose(metrics.nrmse(recon, truth, mask), 100 * 1 / math.sqrt(14))


def test_demeaned_by_hand(pair):
    recon, truth, mask = pair
    # recon - mean: [-4/3, -1/3, 5/3]; truth - mean: [-1, 0, 1]; diff [-1/3, -1/3, 2/3]
    expected = 100 * math.sqrt(1 / 9 + 1 / 9 + 4 / 9) / math.sqrt(2)
    assert math.isclose(metrics.nrmse_demeaned(recon, truth, mask), expected)


def test_detrended_removes_a_linear_scaling(pair):
    recon, truth, mask = pair
    assert metrics.nrmse_detrended(2.0 * truth + 0.5 * mask, truth, mask) < 1e-9
    assert metrics.nrmse(2.0 * truth, truth, mask) == pytest.approx(100.0)


def test_psnr_by_hand(pair):
    recon, truth, mask = pair
    assert math.isclose(metrics.psnr(recon, truth, mask), 20 * math.log10(3 / math.sqrt(1 / 3)))


def test_ssim_and_xsim_are_one_for_identical_maps_and_drop_with_noise():
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 0.05, (16, 16, 16))
    mask = np.ones_like(truth, bool)
    assert metrics.ssim(truth, truth, mask) == pytest.approx(1.0)
    assert metrics.xsim(truth, truth, mask) == pytest.approx(1.0)
    noisy = truth + rng.normal(0, 0.05, truth.shape)
    assert metrics.ssim(noisy, truth, mask) < 0.9
    assert metrics.xsim(noisy, truth, mask) < 0.9


def test_xsim_constant_offset_by_hand():
    # constant maps a and b: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1), C1 = 1e-4
    truth = np.full((8, 8, 8), 0.1)
    recon = np.full((8, 8, 8), 0.2)
    mask = np.ones_like(truth, bool)
    c1 = 1e-4
    assert metrics.xsim(recon, truth, mask) == pytest.approx((2 * 0.02 + c1) / (0.01 + 0.04 + c1))


def test_log_kernel_is_zero_sum_and_negative_at_centre():
    k = metrics.log_kernel(1.5, 15)
    assert k.shape == (15, 15, 15)
    assert abs(k.sum()) < 1e-12 and k[7, 7, 7] < 0


def test_hfen_is_linear_in_the_error_and_blind_to_smooth_changes():
    truth = np.zeros((24, 24, 24))
    truth[8:16, 8:16, 8:16] = 0.1
    mask = np.ones_like(truth, bool)
    assert metrics.hfen(truth, truth, mask) == 0.0
    assert metrics.hfen(np.zeros_like(truth), truth, mask) == pytest.approx(100.0)
    assert metrics.hfen(1.5 * truth, truth, mask) == pytest.approx(50.0)
    # the LoG kernel annihilates linear ramps: smooth changes carry no HFEN
    k = metrics.log_kernel()
    assert abs(float((k * (np.arange(15)[:, None, None] * np.ones((15, 15, 15)))).sum())) < 1e-12


def test_calibration_by_hand():
    truth = np.zeros(10)
    mean = np.array([0.5, 1.5, 2.5, 0.1, 0.2, 0.3, 3.0, 0.0, 1.0, 2.0])
    std = np.ones(10)
    c = metrics.calibration(mean, std, truth, np.ones(10, bool))
    assert c["within_1sigma"] == pytest.approx(0.6)  # |err| <= 1: 0.5, 0.1, 0.2, 0.3, 0.0, 1.0
    assert c["within_2sigma"] == pytest.approx(0.8)  # ... and 1.5, 2.0
    rank = metrics.calibration(mean, np.abs(mean) + 0.1, truth, np.ones(10, bool))
    assert rank["spearman_sigma_error"] == pytest.approx(1.0)
