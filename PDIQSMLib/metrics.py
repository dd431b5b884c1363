"""Accuracy and calibration metrics for susceptibility maps (definitions in METHOD.md).

All take numpy arrays ``recon`` and ``truth`` (ppm) and a mask; values outside the mask are ignored.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal, stats


def _inside(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64)[np.asarray(mask) > 0]


def nrmse(recon, truth, mask) -> float:
    """RMSE (%) = 100 ||x - y|| / ||y|| inside the mask (2016 QSM challenge)."""
    x, y = _inside(recon, mask), _inside(truth, mask)
    return float(100.0 * np.linalg.norm(x - y) / np.linalg.norm(y))


def nrmse_demeaned(recon, truth, mask) -> float:
    """NRMSE (%) after subtracting each map's mean inside the mask (2019 challenge)."""
    x, y = _inside(recon, mask), _inside(truth, mask)
    x, y = x - x.mean(), y - y.mean()
    return float(100.0 * np.linalg.norm(x - y) / np.linalg.norm(y))


def nrmse_detrended(recon, truth, mask) -> float:
    """NRMSE (%) after the least-squares linear fit a*recon + c to the truth (2019 challenge's detrending)."""
    x, y = _inside(recon, mask), _inside(truth, mask)
    a, c = np.polyfit(x, y, 1)
    return float(100.0 * np.linalg.norm(a * x + c - y) / np.linalg.norm(y))


def psnr(recon, truth, mask) -> float:
    """20 log10(max |y| / RMSE_abs) inside the mask."""
    x, y = _inside(recon, mask), _inside(truth, mask)
    rmse_abs = np.sqrt(np.mean((x - y) ** 2))
    return float("inf") if rmse_abs == 0 else float(20.0 * np.log10(np.abs(y).max() / rmse_abs))


def log_kernel(sigma: float = 1.5, size: int = 15) -> np.ndarray:
    """Laplacian-of-Gaussian kernel (size^3 voxels), zero-sum, as in the QSM challenge's HFEN."""
    r = np.arange(size) - (size - 1) / 2.0
    x, y, z = np.meshgrid(r, r, r, indexing="ij")
    r2 = x**2 + y**2 + z**2
    g = np.exp(-r2 / (2 * sigma**2))
    g /= g.sum()
    h = g * (r2 - 3 * sigma**2) / sigma**4
    return h - h.mean()


def hfen(recon, truth, mask, sigma: float = 1.5, size: int = 15) -> float:
    """HFEN (%): the NRMSE of the LoG-filtered maps (masked maps filtered, compared inside the mask)."""
    m = np.asarray(mask) > 0
    k = log_kernel(sigma, size)
    fx = signal.fftconvolve(np.where(m, recon, 0.0), k, mode="same")
    fy = signal.fftconvolve(np.where(m, truth, 0.0), k, mode="same")
    return float(100.0 * np.linalg.norm(fx[m] - fy[m]) / np.linalg.norm(fy[m]))


def _ssim_map(x: np.ndarray, y: np.ndarray, window, data_range: float, k1: float, k2: float) -> np.ndarray:
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = window(x), window(y)
    sxx = window(x * x) - mx**2
    syy = window(y * y) - my**2
    sxy = window(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


def ssim(recon, truth, mask, sigma: float = 1.5) -> float:
    """SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03), L = range of the truth in the mask,
    averaged over the mask."""
    m = np.asarray(mask) > 0
    x, y = np.where(m, recon, 0.0).astype(np.float64), np.where(m, truth, 0.0).astype(np.float64)
    data_range = float(y[m].max() - y[m].min()) or 1.0
    window = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5)  # noqa: E731
    return float(_ssim_map(x, y, window, data_range, 0.01, 0.03)[m].mean())


def xsim(recon, truth, mask) -> float:
    """XSIM (Milovic et al. 2022): SSIM on ppm values with L = 1, K1 = 0.01, K2 = 0.001, 5x5x5 windows."""
    m = np.asarray(mask) > 0
    x, y = np.where(m, recon, 0.0).astype(np.float64), np.where(m, truth, 0.0).astype(np.float64)
    window = lambda a: ndimage.uniform_filter(a, 5)  # noqa: E731
    return float(_ssim_map(x, y, window, 1.0, 0.01, 0.001)[m].mean())


def calibration(mean, std, truth, mask) -> dict[str, float]:
    """Share of voxels with |error| within 1 and 2 predicted sigma, and Spearman(sigma, |error|)."""
    err = np.abs(_inside(mean, mask) - _inside(truth, mask))
    s = _inside(std, mask)
    varies = s.size > 2 and np.ptp(s) > 0 and np.ptp(err) > 0  # a constant sigma has no rank correlation
    rho = stats.spearmanr(s, err).statistic if varies else float("nan")
    return {"within_1sigma": float(np.mean(err <= s)), "within_2sigma": float(np.mean(err <= 2 * s)),
            "spearman_sigma_error": float(rho)}


def all_metrics(recon, truth, mask) -> dict[str, float]:
    """The accuracy table for one reconstruction."""
    return {"rmse": nrmse(recon, truth, mask), "rmse_demeaned": nrmse_demeaned(recon, truth, mask),
            "rmse_detrended": nrmse_detrended(recon, truth, mask), "psnr": psnr(recon, truth, mask),
            "ssim": ssim(recon, truth, mask), "xsim": xsim(recon, truth, mask), "hfen": hfen(recon, truth, mask)}
