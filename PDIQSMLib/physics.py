"""The dipole forward model: b = F^-1 D F chi, with D(k) = 1/3 - (k.B0)^2 / |k|^2 and D(0) = 0.

Fields and susceptibilities are in ppm. Arrays are torch tensors whose last three dimensions are the
volume's voxel axes (any leading batch dimensions pass through). Real FFTs are used throughout: D is
real and even, so the operator maps real volumes to real volumes and is self-adjoint.
"""

from __future__ import annotations

import math

import torch

from .geometry import Geometry


def fast_fft_size(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for FFT libraries)."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def padded_shape(shape: tuple[int, ...], pad: float) -> tuple[int, int, int]:
    """Grid the FFT runs on: each axis enlarged by the factor ``pad`` (>= 1) to a fast size."""
    if not pad >= 1.0:
        raise ValueError(f"pad factor must be >= 1, got {pad}")
    if pad == 1.0:
        return tuple(int(n) for n in shape[-3:])
    return tuple(fast_fft_size(math.ceil(n * pad)) for n in shape[-3:])


def kspace_axes(shape: tuple[int, int, int], voxel_size, half: bool = True, dtype=torch.float64, device=None):
    """Spatial frequencies (cycles/mm) along each axis, broadcastable to the (r)FFT grid of ``shape``."""
    freqs = []
    for axis, (n, d) in enumerate(zip(shape, voxel_size)):
        if half and axis == 2:
            f = torch.fft.rfftfreq(n, d=d, dtype=dtype, device=device)
        else:
            f = torch.fft.fftfreq(n, d=d, dtype=dtype, device=device)
        view = [1, 1, 1]
        view[axis] = -1
        freqs.append(f.reshape(view))
    return freqs


def dipole_kernel(shape, geometry: Geometry, half: bool = True, dtype=torch.float32, device=None) -> torch.Tensor:
    """The unit dipole kernel D on the (half, if ``half``) k-space grid of a volume of ``shape``.

    On an even-sized axis the Nyquist sample stands for both +k_N and -k_N. For an oblique B0 the
    cross terms k_i k_j of (k.B0)^2 change sign between those, so D is averaged over both signs
    there (the cross terms with a Nyquist component drop out). That keeps D exactly even, the
    operator exactly real and self-adjoint, and rfft and full-FFT results identical.
    """
    axes = kspace_axes(tuple(shape), geometry.voxel_size, half, torch.float64, device)
    k2 = sum(k**2 for k in axes)
    regular_kb = 0.0
    nyquist_kb2 = 0.0
    for axis, (k, b) in enumerate(zip(axes, geometry.b0_dir)):
        is_nyq = torch.zeros(k.shape, dtype=torch.bool, device=k.device)
        if shape[axis] % 2 == 0:  # the Nyquist sample: index n/2 of fftfreq, the last of rfftfreq
            is_nyq.view(-1)[shape[axis] // 2] = True
        regular_kb = regular_kb + b * torch.where(is_nyq, 0.0, k)
        nyquist_kb2 = nyquist_kb2 + (b * torch.where(is_nyq, k, 0.0)) ** 2
    d = 1.0 / 3.0 - (regular_kb**2 + nyquist_kb2) / torch.where(k2 == 0, torch.ones_like(k2), k2)
    return torch.where(k2 == 0, torch.zeros_like(d), d).to(dtype)


def gradient_kernels(shape, geometry: Geometry, half: bool = True, dtype=torch.complex64, device=None):
    """Fourier symbols of forward differences with periodic ends, divided by voxel size (one per axis)."""
    out = []
    for axis, k in enumerate(kspace_axes(tuple(shape), geometry.voxel_size, half, torch.float64, device)):
        d = geometry.voxel_size[axis]
        phase = 2.0 * math.pi * k * d  # k in cycles/mm: k d = m / n for frequency index m
        out.append(((torch.exp(1j * phase) - 1.0) / d).to(dtype))
    return out


class DipoleOperator:
    """Forward model chi -> b on a fixed grid, with optional zero padding; also its adjoint.

    Zero padding (factor ``pad``) embeds the volume in a larger grid before the FFT so that the
    periodic convolution does not wrap fields around the edges; the result is cropped back.
    """

    def __init__(self, shape, geometry: Geometry, pad: float = 1.0, dtype=torch.float32, device=None) -> None:
        self.shape = tuple(int(n) for n in shape[-3:])
        self.geometry = geometry
        self.pad_shape = padded_shape(self.shape, pad)
        self.kernel = dipole_kernel(self.pad_shape, geometry, True, dtype, device)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last three dims to the FFT grid (data stays at the origin corner)."""
        if self.pad_shape == self.shape:
            return x
        extra = [p - n for n, p in zip(self.shape, self.pad_shape)]
        return torch.nn.functional.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]))

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``pad`` (and its adjoint)."""
        nx, ny, nz = self.shape
        return x[..., :nx, :ny, :nz]

    def convolve_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Apply F^-1 D F on the padded grid (input and output on the padded grid)."""
        spectrum = torch.fft.rfftn(x, dim=(-3, -2, -1)) * self.kernel
        return torch.fft.irfftn(spectrum, s=self.pad_shape, dim=(-3, -2, -1))

    def forward(self, chi: torch.Tensor) -> torch.Tensor:
        """Field (ppm) of susceptibility ``chi`` (ppm)."""
        return self.crop(self.convolve_padded(self.pad(chi)))

    def adjoint(self, field: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``forward``: crop^T = pad and D is real and even, so it is the same map."""
        return self.crop(self.convolve_padded(self.pad(field)))

    __call__ = forward


def simulate_field(chi: torch.Tensor, geometry: Geometry, pad: float = 2.0) -> torch.Tensor:
    """Noiseless field of ``chi`` with generous padding (the default for making test data)."""
    return DipoleOperator(chi.shape, geometry, pad, chi.dtype, chi.device).forward(chi)
