"""Power-of-two quantizer: every scale is exactly ``2**k`` with an integer exponent ``k``.

Dequantization then becomes a bit shift, which accelerators and FPGAs without multipliers
need. The exponent is stored as an ``int32`` buffer, never as a float that merely happens to
be close to an integer, and the scale is built from it bit by bit (IEEE-754 exponent field),
so it is exact by construction. Zero-points are integers and are recomputed from the
calibrated lower clipping bound whenever the exponent changes, so they stay integer after
every algorithm step (RAPQ's public code leaves them fractional after rescaling).

Algorithms that optimise exponents (``lowbit.ptq.rapq``) relax ``k`` to a continuous value
outside this class and hand back an integer through :meth:`PoTQuantizer.set_exponent`, which
checks it.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Quantizer
from .registry import register_quantizer

# Normal float32 numbers: exponents outside this range have no exact power-of-two float32.
MIN_EXPONENT, MAX_EXPONENT = -126, 127
ROUNDINGS = ("nearest", "floor", "ceil", "mse")
MSE_CANDIDATES = (-1, 0, 1, 2)  # exponents tried around floor(log2(scale)) by rounding="mse"


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**exponent`` for integer exponents, built from the exponent field."""
    k = exponent.to(torch.int32)
    if bool(((k < MIN_EXPONENT) | (k > MAX_EXPONENT)).any()):
        raise ConfigError(
            f"power-of-two exponent out of float32 range [{MIN_EXPONENT}, {MAX_EXPONENT}]: "
            f"{k.min().item()}..{k.max().item()}; the calibration data is degenerate"
        )
    return torch.bitwise_left_shift(k + 127, 23).view(torch.float32)


def is_pow2(t: torch.Tensor) -> bool:
    """True when every element is exactly a positive power of two."""
    mantissa, _ = torch.frexp(t)
    return bool((mantissa == 0.5).all())


def zero_point_for(
    lo: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer zero-point placing the float ``lo`` on code ``qmin`` (clamped to the range)."""
    return torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


@register_quantizer("pot")
class PoTQuantizer(Quantizer):
    """Uniform quantizer whose scale is ``2**exponent``; ``rounding`` picks the exponent from the
    calibrated float scale (``nearest`` in the log domain is the usual naive PoT baseline).

    ``rounding="mse"`` instead tries the exponents around the calibrated scale and keeps, per
    channel, the one with the least squared error on the observed values: rounding a scale
    down in the log domain can clip a layer's largest weights by up to 29 %, rounding up never
    clips, and which costs less depends on the values. It needs an observer that keeps samples
    (``observer="mse"``).
    """

    def __init__(self, *args, rounding: str = "nearest", **kwargs):
        super().__init__(*args, **kwargs)
        if rounding not in ROUNDINGS:
            raise ConfigError(f"pot rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding
        self.register_buffer("exponent", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("clip_lo", torch.zeros(1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rounding={self.rounding}"

    @torch.no_grad()
    def finish_calibration(self) -> None:
        self._samples = None
        if self.rounding == "mse":
            samples = getattr(self.observer, "samples", None)
            if not samples and self.observer.method == "mse":
                raise ConfigError(
                    f"{self._where()}: observed no values during calibration; is the layer "
                    "reached by the model's forward pass?"
                )
            if not samples:
                raise ConfigError(
                    f"{self._where()}: pot rounding 'mse' needs the observed values; use "
                    f"observer='mse' (got {self.observer.method!r}) or another rounding"
                )
            self._samples = torch.cat(samples, dim=1)
        try:
            super().finish_calibration()
        finally:
            self._samples = None

    def init_from_params(self, scale, zero_point, lo, hi) -> None:
        dev = self.exponent.device
        t = torch.log2(scale.reshape(-1).to(dev, torch.float32))
        self.clip_lo = torch.minimum(lo.reshape(-1).to(dev, torch.float32), torch.zeros(1, device=dev))
        samples = getattr(self, "_samples", None)
        if self.rounding == "mse" and samples is not None:
            k = self._least_error_exponent(torch.floor(t), samples.to(dev))
        else:
            pick = {"floor": torch.floor, "ceil": torch.ceil}.get(self.rounding, torch.round)
            k = pick(t)
        self.set_exponent(k.clamp(MIN_EXPONENT, MAX_EXPONENT))

    def _least_error_exponent(self, base: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Per channel, the exponent in ``base + MSE_CANDIDATES`` with the least squared error
        on ``data`` ([C, n] observed values), the zero-point recomputed for each candidate."""
        qmin, qmax = self.qrange
        lo = self.clip_lo.expand_as(base)
        data = data.float()
        best_k, best_err = base, torch.full_like(base, float("inf"))
        for d in MSE_CANDIDATES:
            k = (base + d).clamp(MIN_EXPONENT, MAX_EXPONENT)
            scale = pow2(k)
            zp = torch.zeros_like(k) if self.symmetric else zero_point_for(lo, scale, qmin, qmax)
            s, z = scale[:, None], zp[:, None]
            q = (torch.clamp(torch.round(data / s) + z, qmin, qmax) - z) * s
            err = (q - data).pow(2).mean(dim=1)
            better = err < best_err
            best_k = torch.where(better, k, best_k)
            best_err = torch.where(better, err, best_err)
        return best_k

    @torch.no_grad()
    def set_exponent(self, exponent: torch.Tensor) -> None:
        """Store integer exponents (checked) and recompute the integer zero-point from them."""
        exponent = torch.as_tensor(exponent, device=self.exponent.device).reshape(-1)
        if exponent.is_floating_point() and not bool(
            (torch.isfinite(exponent) & (exponent == torch.round(exponent))).all()
        ):
            raise ConfigError(
                f"{self._where()}: power-of-two exponents must be integers, got non-integer "
                "values; round the relaxed log2 scale before setting it"
            )
        k = exponent.to(torch.int32).contiguous()
        scale = pow2(k)
        qmin, qmax = self.qrange
        if self.symmetric:
            zp = torch.zeros_like(k)
        else:
            lo = self.clip_lo if self.clip_lo.numel() == k.numel() else self.clip_lo.expand_as(scale)
            zp = zero_point_for(lo, scale, qmin, qmax).to(torch.int32)
        self.exponent = k
        self.zero_point = zp.contiguous()

    @torch.no_grad()
    def set_zero_point(self, zero_point: torch.Tensor) -> None:
        """Store integer zero-points (asymmetric quantizers only) and move the lower clipping
        bound onto them, so that a later :meth:`set_exponent` keeps the same bound."""
        if self.symmetric:
            raise ConfigError(f"{self._where()}: a symmetric quantizer's zero-point is 0")
        z = torch.as_tensor(zero_point, device=self.exponent.device).reshape(-1)
        if z.is_floating_point() and not bool((z == torch.round(z)).all()):
            raise ConfigError(f"{self._where()}: zero-points must be integers, got {z.tolist()}")
        qmin, qmax = self.qrange
        z = z.to(torch.int32).expand_as(self.exponent).clamp(qmin, qmax).contiguous()
        self.zero_point = z
        self.clip_lo = (qmin - z).float() * self.scale()

    def scale(self) -> torch.Tensor:
        """Exact ``2**exponent`` (float32), shaped [C] or [1]."""
        return pow2(self.exponent)

    def scale_zero_point(self):
        scale = self.scale()
        if not is_pow2(scale):  # guards against a state dict edited by hand
            raise ConfigError(f"{self._where()}: scale is not an exact power of two")
        return scale, self.zero_point.float()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        scale = self.scale()
        if self.per_channel and scale.numel() > 1:
            return torch.fake_quantize_per_channel_affine(
                x, scale, self.zero_point, self.ch_axis % x.dim(), qmin, qmax
            )
        return torch.fake_quantize_per_tensor_affine(x, scale, self.zero_point, qmin, qmax)
