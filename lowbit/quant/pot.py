"""Power-of-two quantizer: every scale is exactly ``2**k`` with an integer exponent ``k``.

Dequantization then becomes a bit shift, which accelerators and FPGAs without multipliers
need. The exponent is stored as an ``int32`` buffer, never as a float that merely happens to
be close to an integer, and the scale is built from it bit by bit (IEEE-754 exponent field),
so it is exact by construction. Zero-points are integers and are recomputed from the
calibrated lower clipping bound whenever the exponent changes, so they stay integer after
every algorithm step (RAPQ's public code leaves them fractional after rescaling).

Algorithms that optimise exponents (``lowbit.ptq.rapq``) relax ``k`` to a continuous value
outside this class and hand back an integer through :meth:`~lowbit.quant.Quantizer.load_params`,
which checks it.

Every pass that picks an exponent does it here: :func:`round_exponent` turns a log2 scale
into an integer by one rounding rule, and :func:`choose_exponent` keeps, per element, the
least-error exponent among candidates around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError
from .autograd import fixed_fake_quant, round_ste
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


def round_exponent(log2_scale: torch.Tensor, rounding: str = "nearest", *,
                   ste: bool = False) -> torch.Tensor:
    """Integer-valued exponents (same dtype) from a log2 scale: ``nearest`` (ties to even, as
    ``torch.round``), ``floor`` or ``ceil``. ``ste`` rounds to nearest with a straight-through
    gradient, for a log2 scale that is being learned."""
    if ste:
        if rounding != "nearest":
            raise ConfigError(f"straight-through exponent rounding is 'nearest', got {rounding!r}")
        return round_ste(log2_scale)
    pick = {"nearest": torch.round, "floor": torch.floor, "ceil": torch.ceil}.get(rounding)
    if pick is None:
        raise ConfigError(f"exponent rounding must be nearest, floor or ceil, got {rounding!r}")
    return pick(log2_scale)


def choose_exponent(
    base: torch.Tensor, offsets: Sequence[int],
    error_of: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element of ``base``, the exponent among ``base + offsets`` (clamped to the float32
    range) whose ``error_of(k)`` (shaped like ``base``) is least.

    A candidate replaces the best only when its error is strictly lower, so ties keep the
    earlier offset, and a non-finite error never wins (``base`` stays when none is finite).
    Returns the exponents, their errors and the position in ``offsets`` chosen.
    """
    best_k, best_err = base, torch.full_like(base, float("inf"), dtype=torch.float32)
    best_i = torch.full(base.shape, -1, dtype=torch.long, device=base.device)
    for i, d in enumerate(offsets):
        k = (base + d).clamp(MIN_EXPONENT, MAX_EXPONENT)
        err = error_of(k)
        better = err < best_err
        best_k = torch.where(better, k, best_k)
        best_err = torch.where(better, err, best_err)
        best_i = torch.where(better, i, best_i)
    return best_k, best_err, best_i


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

    power_of_two = True
    param_names = ("scale", "zero_point", "exponent", "clip_lo")
    derived_params = ("scale",)
    required_params = ("exponent",)

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
            k = self._least_error_exponent(round_exponent(t, "floor"), samples.to(dev))
        else:
            k = round_exponent(t, self.rounding)
        self._set_exponent(k.clamp(MIN_EXPONENT, MAX_EXPONENT))

    def _least_error_exponent(self, base: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Per channel, the exponent in ``base + MSE_CANDIDATES`` with the least squared error
        on ``data`` ([C, n] observed values), the zero-point recomputed for each candidate."""
        qmin, qmax = self.qrange
        lo = self.clip_lo.expand_as(base)
        data = data.float()

        def error_of(k: torch.Tensor) -> torch.Tensor:
            scale = pow2(k)
            zp = torch.zeros_like(k) if self.symmetric else zero_point_for(lo, scale, qmin, qmax)
            s, z = scale[:, None], zp[:, None]
            q = (torch.clamp(torch.round(data / s) + z, qmin, qmax) - z) * s
            return (q - data).pow(2).mean(dim=1)

        return choose_exponent(base, MSE_CANDIDATES, error_of)[0]

    def params(self) -> dict[str, torch.Tensor]:
        """Scale and zero-point, the integer ``exponent`` and the lower clipping bound
        ``clip_lo`` that asymmetric zero-points are recomputed from."""
        return {**super().params(), "exponent": self.exponent.clone(),
                "clip_lo": self.clip_lo.clone()}

    def _missing_params(self, params) -> list[str]:
        return [] if "exponent" in params or "scale" in params else ["exponent"]

    def _load_params(self, params) -> None:
        """``exponent`` (or an exact power-of-two ``scale``) recomputes the zero-point from
        ``clip_lo`` unless one is given; a ``zero_point`` given without ``clip_lo`` moves the
        bound onto it, so a later exponent keeps it."""
        k = params.get("exponent")
        if "scale" in params:
            scale = params["scale"].float()
            if not bool((scale > 0).all()) or not is_pow2(scale):
                raise ConfigError(f"{self._where()}: a 'pot' scale must be an exact power of two, "
                                  f"got {scale.tolist()}; give integer exponents instead")
            from_scale = torch.frexp(scale)[1] - 1
            if k is not None and not torch.equal(from_scale.to(k.dtype), k):
                raise ConfigError(f"{self._where()}: scale {scale.tolist()} is not 2**exponent "
                                  f"for exponent {k.tolist()}; give one of them")
            k = from_scale
        if "clip_lo" in params:
            lo = params["clip_lo"].float()
            if bool((lo > 0).any()):
                raise ConfigError(f"{self._where()}: clip_lo is the float value on the lowest "
                                  f"code and must be <= 0, got {lo.tolist()}")
            self.clip_lo = lo.to(self.exponent.device).contiguous()
        if k is not None:
            self._set_exponent(k)
        if "zero_point" in params:
            self._set_zero_point(params["zero_point"], move_bound="clip_lo" not in params)

    def _set_exponent(self, exponent: torch.Tensor) -> None:
        """Store integer exponents (checked) and recompute the integer zero-point from them."""
        exponent = torch.as_tensor(exponent, device=self.exponent.device).reshape(-1)
        if exponent.is_floating_point() and not bool(
            (torch.isfinite(exponent) & (exponent == torch.round(exponent))).all()
        ):
            raise ConfigError(
                f"{self._where()}: power-of-two exponents must be integers, got non-integer "
                "values; round the relaxed log2 scale (lowbit.quant.pot.round_exponent) first"
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

    def _set_zero_point(self, zero_point: torch.Tensor, move_bound: bool) -> None:
        """Store checked integer zero-points; ``move_bound`` puts the lower clipping bound on
        them, so that a later exponent keeps the same bound."""
        z = self._check_zero_point(zero_point.to(self.exponent.device))
        z = z.expand_as(self.exponent).contiguous()
        self.zero_point = z
        if move_bound:
            self.clip_lo = (self.qrange[0] - z).float() * pow2(self.exponent)

    def scale_zero_point(self):
        scale = pow2(self.exponent)
        if not is_pow2(scale):  # guards against a state dict edited by hand
            raise ConfigError(f"{self._where()}: scale is not an exact power of two")
        return scale, self.zero_point.float()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        # the reciprocal of a power of two is exact, so this is torch's fake-quantize kernel's
        # arithmetic (x * (1 / s)), in passes that run faster with the backward pass
        scale = self.broadcast(pow2(self.exponent), x)
        zp = self.broadcast(self.zero_point.to(x.dtype), x)
        return fixed_fake_quant(x, 1.0 / scale, scale, zp, qmin, qmax)
