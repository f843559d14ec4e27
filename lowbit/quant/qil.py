"""QIL: quantization-interval learning (Jung et al., CVPR 2019).

Each quantizer learns an interval ``[c - d, c + d]`` of magnitudes: below it values are pruned
to zero, above it they are clipped, inside it they are mapped to the grid. The paper's
*transformer* for weights is ::

    T_W(w) = 0                              if |w| <  c - d
             sign(w)                        if |w| >  c + d
             sign(w) * (alpha |w| + beta)^g otherwise,   alpha = 0.5 / d, beta = 0.5 - 0.5 c / d

and for activations (non-negative, ``g = 1``) ``T_X(x) = clamp(alpha x + beta, 0, 1)``. The
*discretizer* is ``D(t) = round(t * q) / q`` with ``q = 2^(N-1) - 1`` levels per side for signed
tensors (2-bit weights are ternary) and ``q = 2^N - 1`` for unsigned ones.

The paper's output lives in ``[-1, 1]`` / ``[0, 1]`` and relies on the BatchNorm after each layer
to absorb the scale. lowbit folds BatchNorm by default and starts from pretrained weights, so the
output is ``D(T(x)) * (c + d)``: the same grid, expressed in the units of the input. With a
BatchNorm after the layer the factor is absorbed exactly as in the paper; without one it keeps
the pretrained function. At initialisation ``c = d = hi / 2`` (``hi`` from the range observer),
which makes the quantizer *identical* to a symmetric uniform quantizer clipping at ``hi``.

Integer form: codes are ``round(T(x) * q)``, scale ``(c + d) / q``, zero-point 0, so
``codes * scale`` equals the forward output exactly. For weights with ``g != 1`` the codes are
the uniform codes of the *transformed* weight (the map from ``w`` to codes is non-uniform, the
map from codes to values is uniform): integer inference needs only the codes and the scale.
Use :meth:`QILQuantizer.integer_form`, not ``scale_zero_point`` with a plain round, to get them.

Gradients: rounding is straight-through; ``c``, ``d`` and ``g`` get the exact derivatives of the
transformer inside the interval and zero outside it. At the lower edge (``T = 0``) the power is
not differentiated (``0^g`` has an infinite slope for ``g < 1`` and ``log 0`` for ``g``), so every
gradient is finite. ``d`` is clamped to ``D_MIN`` in the forward pass; an interval that shrinks
to it is reported as collapsed by :meth:`QILQuantizer.collapsed` (the trainer stops on it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .autograd import grad_scale, round_ste
from .base import IntegerForm, Quantizer
from .registry import register_quantizer

D_MIN = 1e-6
GAMMA_MIN = 1e-2


class _UnsignedInterval(torch.autograd.Function):
    """Fused activation path (``g = 1``, one interval): few passes over the tensor, since
    activations dominate the cost of fake-quantized training. Matches the autograd path."""

    @staticmethod
    def forward(ctx, x, c, d, levels: int):
        upper = c + d
        alpha = 0.5 / d
        beta = 0.5 - c * alpha
        t = torch.addcmul(beta, x, alpha).clamp_(0.0, 1.0).mul_(levels).round_()
        out = t.mul_(upper / levels)
        ctx.levels = levels
        ctx.save_for_backward(x, out, c, d)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out, c, d = ctx.saved_tensors
        upper = c + d
        lo = c - d
        inside = (x >= lo) & (x <= upper)
        gm = torch.where(inside, g, 0.0)
        grad_x = gm * (upper * 0.5 / d) if ctx.needs_input_grad[0] else None
        sum_gm = gm.sum()
        sum_gmx = (gm * x).sum()
        sum_gout = (g * out).sum() / upper
        # out = D(T) * (c + d): d out/dc = -(c+d)/(2d) inside + D;  d out/dd = -(c+d)(x-c)/(2d^2) inside + D
        grad_c = -(upper * 0.5 / d) * sum_gm + sum_gout
        grad_d = -(upper * 0.5 / (d * d)) * (sum_gmx - c * sum_gm) + sum_gout
        return grad_x, grad_c.reshape(c.shape), grad_d.reshape(d.shape), None


@register_quantizer("qil")
class QILQuantizer(Quantizer):
    """Interval quantizer; ``signed=True`` is the weight form, ``signed=False`` the activation form.

    Options (``QuantizerSpec.options``): ``gamma`` (initial exponent, default 1),
    ``learn_gamma`` (train it; the paper does for weights, activations keep 1),
    ``grad_scale`` (scale the gradients of c, d, g by ``1/sqrt(n * q)`` as LSQ does, so one
    learning rate suits every layer; not in the paper, default on), ``fused`` (use the fused
    activation kernel when it applies, default on).
    """

    def __init__(
        self,
        *args,
        gamma: float = 1.0,
        learn_gamma: bool = False,
        grad_scale: bool = True,
        fused: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not gamma > 0:
            from ..errors import ConfigError

            raise ConfigError(f"QIL gamma must be positive, got {gamma}")
        self.c = nn.Parameter(torch.full((1,), 0.5))
        self.d = nn.Parameter(torch.full((1,), 0.5))
        self.gamma = nn.Parameter(torch.tensor([float(gamma)]), requires_grad=learn_gamma)
        self.learn_gamma = learn_gamma
        self.use_grad_scale = grad_scale
        self.fused = fused

    @property
    def qrange(self) -> tuple[int, int]:
        q = self.levels
        return (-q, q) if self._is_signed else (0, q)

    @property
    def _is_signed(self) -> bool:
        return True if self.signed is None else bool(self.signed)

    @property
    def levels(self) -> int:
        """Grid steps per side: ``2^(N-1) - 1`` signed (2 bits: ternary), ``2^N - 1`` unsigned."""
        return 2 ** (self.bits - 1) - 1 if self._is_signed else 2**self.bits - 1

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learn_gamma={self.learn_gamma}"

    @torch.no_grad()
    def init_from_params(self, scale, zero_point, lo, hi) -> None:
        """Interval ``[0, hi]`` (``c = d = hi/2``): equal to the uniform quantizer at ``hi``."""
        dev = self.c.device
        lo, hi = lo.reshape(-1).float(), hi.reshape(-1).float()
        top = torch.maximum(-lo, hi) if self._is_signed else hi.clamp_min(0)
        top = top.clamp_min(4 * D_MIN).to(dev)
        self.c = nn.Parameter(top / 2)
        self.d = nn.Parameter(top / 2)

    def _param_scale(self, x: torch.Tensor) -> float:
        return 1.0 / math.sqrt(x.numel() / self.c.numel() * max(self.levels, 1))

    def _params(self, x: torch.Tensor):
        c, d, gamma = self.c, self.d, self.gamma
        if self.use_grad_scale:
            s = self._param_scale(x)
            c, d = grad_scale(c, s), grad_scale(d, s)
            if self.learn_gamma:
                gamma = grad_scale(gamma, s)
        return c, d.clamp_min(D_MIN), gamma.clamp_min(GAMMA_MIN)

    def _gamma_is_one(self) -> bool:
        return not self.learn_gamma and float(self.gamma) == 1.0

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's transformer ``T(x)`` (values in ``[-1, 1]`` signed, ``[0, 1]`` unsigned)."""
        c, d, gamma = self._params(x)
        c, d = self._broadcast(c, x), self._broadcast(d, x)
        mag = x.abs() if self._is_signed else x
        u = ((mag - c) / (2 * d) + 0.5).clamp(0.0, 1.0)
        if not self._gamma_is_one():
            pos = u > 0
            u = torch.where(pos, torch.where(pos, u, torch.ones_like(u)).pow(gamma.reshape(())), 0.0)
        return u * torch.sign(x) if self._is_signed else u

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        q = self.levels
        if (
            self.fused and not self._is_signed and not self.per_channel
            and self._gamma_is_one()
        ):
            c, d, _ = self._params(x)
            return _UnsignedInterval.apply(x, c, d, q)
        c, d, _ = self._params(x)
        upper = self._broadcast(c + d, x)
        return round_ste(self.transform(x) * q) * (upper / q)

    def scale_zero_point(self):
        """Scale of the output grid ``(c + d) / q`` and zero-point 0 (see the module docstring)."""
        d = self.d.detach().clamp_min(D_MIN)
        scale = (self.c.detach() + d) / self.levels
        return scale, torch.zeros_like(scale)

    @torch.no_grad()
    def integer_form(self, x: torch.Tensor) -> IntegerForm:
        """Codes ``round(T(x) * q)``: ``codes * scale`` equals :meth:`quantize` exactly."""
        self.require_calibrated()
        qmin, qmax = self.qrange
        codes = torch.round(self.transform(x) * self.levels).clamp(qmin, qmax).to(torch.int32)
        scale, zp = self.scale_zero_point()
        return IntegerForm(codes, scale.clone(), zp.to(torch.int32), self.bits,
                           self._is_signed, self.axis)

    @torch.no_grad()
    def collapsed(self) -> torch.Tensor:
        """Bool tensor (no sync): the interval has shrunk to nothing or is not finite."""
        bad = (self.d <= D_MIN) | ~torch.isfinite(self.d) | ~torch.isfinite(self.c)
        return bad.any() | ~torch.isfinite(self.gamma).all()
