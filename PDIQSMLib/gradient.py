"""Finite differences with physical voxel size: the gradient behind every TV term, and its adjoint.

Forward differences with periodic ends, so that they are diagonalised by the same FFT as the
dipole kernel (``physics.gradient_kernels`` gives their Fourier symbols).
"""

from __future__ import annotations

import torch


def grad(x: torch.Tensor, voxel_size) -> torch.Tensor:
    """Forward differences of the last three dims, stacked in a new dim -4: shape (..., 3, X, Y, Z)."""
    # diff of x with its first slice appended is x[i+1] - x[i], wrapping at the end
    return torch.stack([torch.diff(x, dim=d, append=x.narrow(d, 0, 1)) / h
                        for d, h in zip((-3, -2, -1), voxel_size)], dim=-4)


def grad_adjoint(g: torch.Tensor, voxel_size) -> torch.Tensor:
    """Adjoint of ``grad`` (minus the divergence): maps (..., 3, X, Y, Z) back to (..., X, Y, Z)."""
    out = torch.zeros_like(g[..., 0, :, :, :])
    for i, (d, h) in enumerate(zip((-3, -2, -1), voxel_size)):
        c = g[..., i, :, :, :]
        n = c.shape[d]
        # (c[n-1] - c[n]) / h with periodic wrap: out[0] gets c[-1] - c[0]
        out.narrow(d, 1, n - 1).add_(c.narrow(d, 0, n - 1) - c.narrow(d, 1, n - 1), alpha=1.0 / h)
        out.narrow(d, 0, 1).add_(c.narrow(d, n - 1, 1) - c.narrow(d, 0, 1), alpha=1.0 / h)
    return out
