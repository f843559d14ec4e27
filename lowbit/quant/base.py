"""The quantizer base class, its modes, and the integer form every quantizer hands out.

A quantizer is an ``nn.Module`` that fake-quantizes one tensor, owns its parameters, knows
its bitwidth, and can export integer codes with an integer zero-point. Its behaviour is set
by an explicit mode (as MQBench does) rather than flags in ``forward``:

* ``float``: identity;
* ``calibrate``: identity, while an observer records the range of what passes;
* ``quantize``: fake quantization with the current parameters.

New quantizers (interval, power-of-two, stochastic bitwidth, strategy mixture) subclass
:class:`Quantizer` and implement :meth:`quantize`, :meth:`scale_zero_point` and the parameter
contract (:meth:`Quantizer.params` / :meth:`Quantizer.load_params`, described on the class).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError
from .autograd import quantize_to_int
from .observers import Observer, build_observer

MIN_BITS, MAX_BITS = 1, 8
META_KEY = "qmeta"
EPS = 1e-8


class QuantMode(str, Enum):
    FLOAT = "float"
    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"


def check_bits(bits: int, signed: bool | None = None, quantizer: type | None = None) -> int:
    """Validate a bitwidth with a message that says what is allowed.

    Signed 1 bit means binary weights ({-s, +s}); only quantizer classes whose
    ``min_signed_bits`` is 1 implement it, so ``quantizer`` (the class, None: the base) decides.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}; "
            "keep a layer in float by excluding it from quantization instead"
        )
    floor = getattr(quantizer, "min_signed_bits", 2)
    if signed and bits < floor:
        from .registry import QUANTIZERS

        kind = getattr(quantizer, "kind", "base")
        binary = sorted(k for k, c in QUANTIZERS.items() if getattr(c, "min_signed_bits", 2) == 1)
        raise ConfigError(
            f"signed {kind!r} quantization needs at least {floor} bits, got {bits}; binary "
            f"(signed 1-bit) weights need quantizer kind {' or '.join(map(repr, binary))}, "
            "and unsigned quantization allows 1 bit"
        )
    return bits


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer code range; ``narrow`` drops the most negative code (symmetric weights).

    Signed 1 bit is binary: codes -1 and +1 (0 is never produced), so the range is (-1, 1).
    """
    if signed and bits == 1:
        return -1, 1
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, 2**bits - 1


def range_to_params(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point covering ``[lo, hi]`` (the range always contains 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        if signed:
            amax = torch.maximum(-lo, hi)
            scale = amax / qmax
        else:
            scale = hi / qmax
        scale = scale.clamp_min(EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


@dataclass
class IntegerForm:
    """Integer codes with their scale and integer zero-point: ``x ≈ (codes - zero_point) * scale``.

    Everything an integer runtime or a packed file needs: the codes lie in ``qrange``
    (``narrow_range`` drops the most negative signed code; signed 1 bit is binary, codes
    -1 and +1), and ``exponent`` is set for power-of-two kinds (``scale == 2**exponent``
    exactly), so dequantization is a shift.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    axis: int | None = None
    narrow_range: bool = False
    exponent: torch.Tensor | None = None

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed, self.narrow_range and self.signed)

    @property
    def power_of_two(self) -> bool:
        return self.exponent is not None

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.numel() == 1:
            return t.reshape(())
        shape = [1] * self.codes.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def dequantize(self) -> torch.Tensor:
        zp = self._expand(self.zero_point).to(torch.float32)
        return (self.codes.to(torch.float32) - zp) * self._expand(self.scale)


class Quantizer(nn.Module):
    """Base class for all quantizers; see the module docstring for the mode contract.

    Parameter contract, the one way algorithms outside :mod:`lowbit.quant` read and write a
    quantizer (so none of them needs to know a kind's storage):

    * :meth:`scale_zero_point` is the only way to read the effective scale (positive, float32)
      and zero-point (integer-valued), shaped ``[C]`` or ``[1]``; it is a method on every kind.
      Attributes such as ``scale``, ``exponent`` or ``c`` are each kind's private storage.
    * :meth:`params` returns detached copies of every parameter by name: always ``scale`` and
      ``zero_point`` (``int32``), then the kind's own (``pot``: ``exponent``, ``clip_lo``;
      ``qil``: ``c``, ``d``, ``gamma``; ``sdq``: ``dbp``). Names in :attr:`derived_params`
      are computed from the others.
    * :meth:`load_params` sets any subset of those names, validated (known names, one value
      per channel, finite, integer zero-points in the code range and 0 when symmetric, the
      kind's own rules) with a :class:`~lowbit.errors.ConfigError` that names the problem.
      A derived name may be given only when it agrees with the rest (``pot`` turns an exact
      power-of-two ``scale`` into its exponent). ``q.load_params(q.params())`` leaves the
      quantized output unchanged; a quantizer never calibrated needs its
      :attr:`required_params` and is calibrated afterwards.
    * :attr:`power_of_two` says the kind's scales are exact powers of two set by an integer
      ``exponent``; algorithms test it rather than the class.
    """

    kind = "base"
    min_signed_bits = 2  # 1 where the subclass implements binary weights
    power_of_two = False
    has_integer_form = True  # False: values are not codes on one uniform grid (no export)
    param_names: tuple[str, ...] = ("scale", "zero_point")
    derived_params: tuple[str, ...] = ()
    required_params: tuple[str, ...] = ("scale", "zero_point")
    scalar_params: tuple[str, ...] = ()  # one value for the whole tensor, even per channel

    def __init__(
        self,
        bits: int = 8,
        signed: bool | None = None,
        symmetric: bool = True,
        per_channel: bool = False,
        ch_axis: int = 0,
        narrow_range: bool = False,
        observer: str = "minmax",
        observer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.signed = signed
        self.symmetric = symmetric
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.narrow_range = narrow_range
        self.mode = QuantMode.FLOAT
        self.calibrated = False
        self.name = ""
        self.static = False
        self._bits = self._check_bits(bits, signed)
        self.observer: Observer = build_observer(
            observer, axis=ch_axis if per_channel else None, **(observer_kwargs or {})
        )

    @property
    def bits(self) -> int:
        return self._bits

    def _check_bits(self, bits: int, signed: bool | None) -> int:
        """:func:`check_bits` for this class (subclasses add their own limits)."""
        return check_bits(bits, signed, type(self))

    @property
    def binary(self) -> bool:
        """Signed 1 bit: weights are ``s * sign(w)``."""
        return self.bits == 1 and bool(self.signed)

    def set_bits(self, bits: int) -> None:
        """Change the bitwidth (mixed-precision search); parameters keep their meaning."""
        self._bits = self._check_bits(bits, self.signed)

    @property
    def qrange(self) -> tuple[int, int]:
        signed = True if self.signed is None else self.signed
        return int_range(self.bits, signed, self.narrow_range and signed)

    @property
    def axis(self) -> int | None:
        return self.ch_axis if self.per_channel else None

    def extra_repr(self) -> str:
        gran = f"per_channel(axis={self.ch_axis})" if self.per_channel else "per_tensor"
        return (
            f"bits={self.bits}, signed={self.signed}, symmetric={self.symmetric}, {gran}, "
            f"observer={self.observer.method}, mode={self.mode.value}"
        )

    def _where(self) -> str:
        return f"quantizer {self.name!r}" if self.name else "quantizer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.FLOAT:
            return x
        if self.mode is QuantMode.CALIBRATE:
            self.observe(x)
            return x
        return self.quantize(x)

    def _check_axis(self, x: torch.Tensor) -> None:
        if self.per_channel and not -x.dim() <= self.ch_axis < x.dim():
            raise ConfigError(
                f"{self._where()}: per-channel axis {self.ch_axis} does not exist for a "
                f"{x.dim()}-d tensor of shape {tuple(x.shape)}; use an axis in "
                f"[0, {x.dim() - 1}] or per-tensor quantization"
            )

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record the range of ``x``; NaN/Inf stops calibration with the layer's name.

        A ``static`` quantizer (a weight) sees the same tensor every batch, so it observes once.
        """
        if self.static and self.observer.batches > 0:
            return
        self._check_axis(x)
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(
                f"NaN or Inf met during calibration at {self._where()}; check the input data "
                "and the float model (does it produce finite outputs on this batch?)"
            )
        if self.per_channel and self.ch_axis < 0:
            self.observer.axis = self.ch_axis % x.dim()
        self.observer.update(x)

    def _observed_signed(self) -> bool:
        if self.signed is not None:
            return self.signed
        return bool((self.observer.lo < 0).any())

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Turn observed statistics into parameters; error if this quantizer saw no data."""
        if self.observer.batches == 0:
            raise CalibrationError(
                f"{self._where()} saw no data during calibration: the calibration set is empty "
                "or this layer is never executed by forward()"
            )
        if self.signed is None:
            self.signed = self._observed_signed()
            self._check_bits(self.bits, self.signed)
        qmin, qmax = self.qrange

        def qrange_fn(data, lo, hi):
            scale, zp = range_to_params(lo, hi, qmin, qmax, self.symmetric, self.signed)
            scale, zp = scale[:, None], zp[:, None]
            return (torch.clamp(torch.round(data / scale) + zp, qmin, qmax) - zp) * scale

        lo, hi = self.observer.compute_range(qrange_fn)
        scale, zero_point = range_to_params(lo, hi, qmin, qmax, self.symmetric, self.signed)
        self.init_from_params(scale, zero_point, lo, hi)
        self.calibrated = True
        self.observer.reset()

    def init_from_params(
        self, scale: torch.Tensor, zero_point: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> None:
        """Set the quantizer's parameters from a calibrated scale/zero-point (subclass hook)."""
        raise NotImplementedError

    def require_calibrated(self) -> None:
        if not self.calibrated:
            raise CalibrationError(
                f"{self._where()} is in 'quantize' mode but was never calibrated; run "
                "lowbit.calibrate(model, data) (or load a calibrated state dict) first"
            )

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current scale and integer-valued zero-point, shaped [C] or [1]."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, torch.Tensor]:
        """Detached copies of every parameter by name (see the class docstring)."""
        scale, zp = self.scale_zero_point()
        return {"scale": scale.detach().clone(), "zero_point": zp.detach().to(torch.int32)}

    @torch.no_grad()
    def load_params(self, params: Mapping[str, torch.Tensor]) -> None:
        """Set the parameters named in ``params`` (any subset of :meth:`params`), validated."""
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise ConfigError(
                f"{self._where()} (kind {self.kind!r}) has no parameter {', '.join(unknown)}; "
                f"its parameters are {', '.join(self.param_names)}"
            )
        if not self.calibrated:
            if self.signed is None:
                raise ConfigError(
                    f"{self._where()}: its signedness is decided by calibration; calibrate it "
                    "first or build it with signed=True/False before loading parameters"
                )
            missing = self._missing_params(params)
            if missing:
                raise ConfigError(
                    f"{self._where()} was never calibrated, so loading parameters needs "
                    f"{', '.join(missing)} too; calibrate it first or give them"
                )
        values = self._check_lengths({k: self._as_param(k, v) for k, v in params.items()})
        self._load_params(values)
        self.calibrated = True

    def _missing_params(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return [k for k in self.required_params if k not in params]

    def _load_params(self, params: dict[str, torch.Tensor]) -> None:
        """Store the checked 1-D tensors (subclass hook; the kind's own checks go here)."""
        raise NotImplementedError

    def _as_param(self, name: str, value) -> torch.Tensor:
        t = torch.as_tensor(value).detach().reshape(-1)
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{self._where()}: parameter {name!r} must be finite values, got "
                              f"{t.tolist()}")
        return t

    def _check_lengths(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One value per channel (as calibrated; one per tensor unless per-channel)."""
        channel = {k: v for k, v in params.items() if k not in self.scalar_params}
        if self.calibrated:
            n = self.scale_zero_point()[0].numel()
        else:
            n = max((v.numel() for v in channel.values()), default=1)
        if not self.per_channel:
            n = 1
        for k, v in params.items():
            want = 1 if k in self.scalar_params else n
            if v.numel() != want:
                raise ConfigError(
                    f"{self._where()}: parameter {k!r} needs {want} value(s) (one per "
                    f"{'channel' if want > 1 else 'tensor'}), got {v.numel()}"
                )
        return params

    def _check_zero_point(self, z: torch.Tensor) -> torch.Tensor:
        """Integer zero-points in the code range, all 0 on a symmetric grid, as ``int32``."""
        qmin, qmax = self.qrange
        if z.is_floating_point() and not bool((z == torch.round(z)).all()):
            raise ConfigError(f"{self._where()}: zero-points must be integers, got {z.tolist()}")
        if bool(((z < qmin) | (z > qmax)).any()):
            raise ConfigError(f"{self._where()}: zero-points must lie in the code range "
                              f"[{qmin}, {qmax}], got {z.tolist()}")
        if self.symmetric and bool((z != 0).any()):
            raise ConfigError(f"{self._where()}: a symmetric quantizer's zero-point is 0, got "
                              f"{z.tolist()}; build it with symmetric=False for an offset grid")
        return z.to(torch.int32)

    def _check_positive(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not bool((t > 0).all()):
            raise ConfigError(f"{self._where()}: parameter {name!r} must be positive, got "
                              f"{t.tolist()}")
        return t.to(torch.float32)

    def _store(self, name: str, value: torch.Tensor, device: torch.device) -> None:
        """Replace a buffer, or copy into a parameter in place when the shape is unchanged (an
        optimiser holding it keeps training the same tensor)."""
        old = getattr(self, name)
        value = value.to(device, old.dtype).contiguous()
        if isinstance(old, nn.Parameter):
            if old.shape == value.shape:
                old.copy_(value)
            else:
                setattr(self, name, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            setattr(self, name, value)

    def broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A ``[C]`` or ``[1]`` parameter shaped to broadcast over ``x`` along the channel axis."""
        if not self.per_channel or t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.ch_axis] = -1
        return t.reshape(shape)

    def _form(self, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
              signed: bool | None = None) -> IntegerForm:
        """An :class:`IntegerForm` of this quantizer's grid around ``codes``."""
        exponent = (torch.frexp(scale.detach())[1] - 1).to(torch.int32) if self.power_of_two \
            else None
        signed = bool(self.signed) if signed is None else signed
        narrow = signed and self.bits > 1 and self.qrange[0] > -(2 ** (self.bits - 1))
        return IntegerForm(codes, scale.detach().clone(), zp.detach().to(torch.int32), self.bits,
                           signed, self.axis, narrow, exponent)

    def _check_integer_form(self) -> None:
        if not self.has_integer_form:
            raise ConfigError(
                f"{self._where()}: quantizer kind {self.kind!r} has no integer form (its values "
                "are not codes on one uniform grid), so it cannot be exported as integers; keep "
                "the layer float (exclude it) or quantize it with a uniform kind"
            )
        self.require_calibrated()

    @torch.no_grad()
    def integer_form(self, x: torch.Tensor) -> IntegerForm:
        """Integer codes of ``x`` such that ``dequantize()`` equals ``quantize(x)``."""
        self._check_integer_form()
        scale, zp = self.scale_zero_point()
        qmin, qmax = self.qrange
        codes = quantize_to_int(x, self.broadcast(scale, x), self.broadcast(zp, x), qmin, qmax)
        return self._form(codes, scale, zp)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        signed = -1 if self.signed is None else int(self.signed)
        destination[prefix + META_KEY] = torch.tensor([self.bits, signed, int(self.calibrated)])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        meta = state_dict.get(prefix + META_KEY)
        if meta is not None:
            bits, signed, calibrated = (int(v) for v in meta.tolist())
            self.signed = None if signed < 0 else bool(signed)
            self._bits = self._check_bits(bits, self.signed)
            self.calibrated = bool(calibrated)
        for name, buf in list(self._buffers.items()) + list(self._parameters.items()):
            key = prefix + name
            if key in state_dict and buf is not None and buf.shape != state_dict[key].shape:
                new = torch.empty_like(state_dict[key], device=buf.device, dtype=buf.dtype)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(new, requires_grad=buf.requires_grad)
                else:
                    self._buffers[name] = new
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + META_KEY in unexpected_keys:
            unexpected_keys.remove(prefix + META_KEY)


class SymmetricLevels:
    """Grid steps per side of a zero-point-0 quantizer (QIL, PACT): ``2^(N-1) - 1`` signed
    (2 bits: ternary), ``2^N - 1`` unsigned; an undecided sign counts as signed."""

    @property
    def _is_signed(self) -> bool:
        return True if self.signed is None else bool(self.signed)

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self._is_signed else 2**self.bits - 1

    @property
    def qrange(self) -> tuple[int, int]:
        q = self.levels
        return (-q, q) if self._is_signed else (0, q)
