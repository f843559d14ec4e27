"""SDQ stochastic-bitwidth quantizer (Huang et al., ICML 2022): LSQ plus a learned bitwidth.

Each quantizer holds a Differentiable Bitwidth Parameter (DBP) ``p`` in [0, 1]: in training,
every step quantizes with ``b - 1`` bits with probability ``p`` and with ``b`` bits otherwise.
The forward pass carries exactly the sampled bitwidth; the backward pass differentiates the
expectation ``p * Q_{b-1}(x) + (1 - p) * Q_b(x)`` so the DBP receives
``sum(grad * (Q_{b-1}(x) - Q_b(x)))``: how much the loss prefers the lower bitwidth. When the
search sees a DBP settle near 1 it calls :meth:`SDQQuantizer.step_down` and the layer keeps
``b - 1`` bits from then on. In evaluation the quantizer is deterministic (``b`` bits).

Both bitwidths share one learned clipping range: the step size of ``b - 1`` bits is the LSQ step
of ``b`` bits times the ratio of the two integer spans, so lowering the bitwidth keeps the range
the weights were trained for, and the integer zero-point stays an integer. Binary (signed 1 bit,
``min_bits=1``) counts as the span 2 of its codes -1 and +1, so with narrow-range weights the
binary magnitude ``s`` equals the 2-bit step: {-s, 0, s} becomes {-s, s} over the same range, and
the step the 1-bit branch trains with is exactly the one :meth:`SDQQuantizer.step_down` keeps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .autograd import binary_fake_quant, grad_scale, learned_fake_quant, round_ste
from .base import EPS, int_range
from .lsq import LSQQuantizer
from .registry import register_quantizer


class _SampledMixture(torch.autograd.Function):
    """Forward: the sampled branch, bit-exact. Backward: the gradient of the expectation."""

    @staticmethod
    def forward(ctx, lo, hi, p, pick):
        if ctx.needs_input_grad[2]:
            ctx.save_for_backward(lo, hi, p)
        else:
            ctx.save_for_backward(p)
        return torch.where(pick, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        p = saved[-1]
        pr = p.reshape(())
        g_lo = grad * pr if ctx.needs_input_grad[0] else None
        g_hi = grad * (1 - pr) if ctx.needs_input_grad[1] else None
        g_p = None
        if ctx.needs_input_grad[2]:
            lo, hi, _ = saved
            g_p = (grad * (lo - hi)).sum().reshape(p.shape)
        return g_lo, g_hi, g_p, None


def span(bits: int, signed: bool, narrow: bool) -> int:
    """Number of integer steps between the smallest and the largest code."""
    lo, hi = int_range(bits, signed, narrow and signed)
    return hi - lo


@register_quantizer("sdq")
class SDQQuantizer(LSQQuantizer):
    """LSQ quantizer with a Differentiable Bitwidth Parameter; see the module docstring.

    ``min_bits`` bounds the search from below (the quantizer never samples under it); 1 allows
    binary weights (symmetric signed quantizers only);
    ``init_dbp`` is where every DBP (re)starts, 0 meaning "always the higher bitwidth".
    ``searching`` is switched off by the search for layers whose bits are fixed (first/last
    layer policy) and after the search; the quantizer then behaves exactly like LSQ.
    """

    def __init__(self, *args, min_bits: int = 2, init_dbp: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_bits(min_bits, self.signed)
        if min_bits > self.bits:
            raise ConfigError(
                f"sdq quantizer: min_bits {min_bits} is above its starting bits {self.bits}; "
                "the bits bounds are reversed: use min_bits <= bits"
            )
        if not 0.0 <= init_dbp < 1.0:
            raise ConfigError(f"sdq quantizer: init_dbp must be in [0, 1), got {init_dbp}")
        self.min_bits = min_bits
        self.init_dbp = init_dbp
        self.dbp = nn.Parameter(torch.full((1,), float(init_dbp)))
        self.searching = True

    param_names = (*LSQQuantizer.param_names, "dbp")
    scalar_params = ("dbp",)

    def params(self) -> dict[str, torch.Tensor]:
        """LSQ's step and zero-point, and the DBP (the probability of the lower bitwidth)."""
        return {**super().params(), "dbp": self.dbp.detach().clone()}

    def _load_params(self, params) -> None:
        super()._load_params(params)
        if "dbp" in params:
            self._store("dbp", params["dbp"].float(), self.dbp.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_bits={self.min_bits}, searching={self.searching}"

    @property
    def can_step_down(self) -> bool:
        return self.searching and self.bits - 1 >= self.min_bits

    def probability(self) -> torch.Tensor:
        """The DBP clamped to [0, 1] in the forward pass, with an identity gradient (so a DBP at
        a bound can still move back); the search also projects it after each step."""
        return self.dbp + (self.dbp.clamp(0.0, 1.0) - self.dbp).detach()

    def expected_bits(self) -> torch.Tensor:
        """``b - p`` while searching (differentiable in the DBP), else ``b``."""
        if self.can_step_down:
            return self.bits - self.probability().reshape(())
        return torch.full((), float(self.bits), device=self.dbp.device)

    def _params_at(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Step (trainable) and integer zero-point for ``bits``, spanning the same range."""
        signed = bool(self.signed)
        qmin, qmax = int_range(bits, signed, self.narrow_range and signed)
        ratio = span(self.bits, signed, self.narrow_range) / span(bits, signed, self.narrow_range)
        scale = self.scale * ratio
        if self.symmetric:
            zp = self.zero_point.detach()
        else:
            cur_min = self.qrange[0]
            zp = torch.clamp(round_ste(qmin + (self.zero_point - cur_min) / ratio), qmin, qmax)
        return scale, zp, qmin, qmax

    def _fake_quant(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        scale, zp, qmin, qmax = self._params_at(bits)
        g = 1.0 / math.sqrt(x.numel() / self.scale.numel() * max(qmax, 1))
        if bits == 1 and self.signed:
            return binary_fake_quant(x, self.broadcast(scale.abs().clamp_min(EPS), x), g)
        s = self.broadcast(grad_scale(scale, g).abs().clamp_min(EPS), x)
        z = self.broadcast(zp if self.symmetric else grad_scale(zp, g), x)
        return learned_fake_quant(x, s, z, qmin, qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.can_step_down):
            return super().quantize(x)
        self.require_calibrated()
        hi = self._fake_quant(x, self.bits)
        lo = self._fake_quant(x, self.bits - 1)
        p = self.probability()
        pick = torch.bernoulli(torch.nan_to_num(p.detach(), nan=0.0).clamp(0.0, 1.0)).bool().reshape(())
        return _SampledMixture.apply(lo, hi, p, pick)

    def set_bits(self, bits: int) -> None:
        """Change the bitwidth keeping the clipping range; the zero-point stays an integer."""
        self._check_bits(bits, self.signed)
        if self.calibrated and bits != self.bits:
            with torch.no_grad():
                scale, zp, _, _ = self._params_at(bits)
                self.scale.copy_(scale)
                self.zero_point.copy_(torch.round(zp))
        self._bits = bits

    @torch.no_grad()
    def step_down(self) -> None:
        """Keep the lower bitwidth from now on and restart the DBP for the next decision."""
        if not self.can_step_down:
            raise ConfigError(
                f"{self._where()}: cannot step down from {self.bits} bits (min_bits "
                f"{self.min_bits}, searching={self.searching})"
            )
        self.set_bits(self.bits - 1)
        self.dbp.fill_(self.init_dbp)
