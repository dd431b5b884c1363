"""Finite differences with physical voxel size: the gradient behind every TV term, and its adjoint.

Forward differences with periodic ends, so that they are diagonalised by the same FFT as the
dipole kernel (``physics.gradient_kernels`` gives their Fourier symbols).
"""

from __future__ import annotations

import torch


def grad(x: torch.Tensor, voxel_size) -> torch.Tensor:
    """Forward differences of the last three dims, stacked in a new dim -4: shape (..., 3, X, Y, Z)."""
    parts = [(torch.roll(x, -1, dims=d) - x) / h for d, h in zip((-3, -2, -1), voxel_size)]
    return torch.stack(parts, dim=-4)


def grad_adjoint(g: torch.Tensor, voxel_size) -> torch.Tensor:
    """Adjoint of ``grad`` (minus the divergence): maps (..., 3, X, Y, Z) back to (..., X, Y, Z)."""
    out = torch.zeros_like(g[..., 0, :, :, :])
    for i, (d, h) in enumerate(zip((-3, -2, -1), voxel_size)):
        c = g[..., i, :, :, :]
        out = out + (torch.roll(c, 1, dims=d) - c) / h
    return out
