"""Image-quality metrics of super-resolution, batched on the input's device.

The EDSR protocol: outputs rounded to 8-bit pixels, the luma (Y) channel of ITU-R BT.601 as
Matlab's ``rgb2ycbcr`` defines it (not rounded to integers, as EDSR's own evaluation), and a
border of ``scale`` pixels cropped before comparing. SSIM is Wang et al.'s: an 11x11 Gaussian
window of sigma 1.5 applied without padding, constants K1 = 0.01 and K2 = 0.03 of the 255 range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIXEL_MAX = 255.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def to_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised model values back to 8-bit pixel values (clamped and rounded, as an image
    written to disk would be)."""
    return (x * std + mean).clamp(0.0, PIXEL_MAX).round()


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB pixels in 0..255 -> ``[N, 1, H, W]`` Y in 16..235."""
    w = torch.tensor(_Y_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return 16.0 + (rgb * w).sum(dim=1, keepdim=True) / PIXEL_MAX


def shave(x: torch.Tensor, border: int) -> torch.Tensor:
    """Drop ``border`` pixels on every side (the upsampler's unreliable edge)."""
    if border <= 0:
        return x
    return x[..., border:-border, border:-border]


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = PIXEL_MAX) -> torch.Tensor:
    """Per-image PSNR in dB of ``[N, C, H, W]`` tensors (inf where they are equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, peak: float = PIXEL_MAX, size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM of single-channel ``[N, 1, H, W]`` images (each side >= ``size``)."""
    a, b = a.double(), b.double()
    win = _gaussian_window(size, sigma, a.dtype, a.device)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    blur = lambda t: F.conv2d(t, win)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def y_metrics(out: torch.Tensor, target: torch.Tensor, border: int) -> tuple[torch.Tensor, ...]:
    """``(psnr_y, ssim_y)`` per image of 8-bit RGB pixel tensors, after the border crop."""
    ya, yb = shave(rgb_to_y(out), border), shave(rgb_to_y(target), border)
    return psnr(ya, yb), ssim(ya, yb)
