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
below ``COLLAPSE`` times its initial width (buffer ``ref``) is reported as collapsed by
:meth:`QILQuantizer.collapsed` (the trainer stops on it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .autograd import flat_dot as _dot
from .autograd import grad_scale, round_ste
from .base import IntegerForm, Quantizer, SymmetricLevels
from .registry import register_quantizer

D_MIN = 1e-6
GAMMA_MIN = 1e-2
COLLAPSE = 1e-4  # an interval below this fraction of its initial width has collapsed


class _UnsignedInterval(torch.autograd.Function):
    """Fused activation path (``g = 1``, one interval): activations dominate the cost of
    fake-quantized training, so forward and backward make as few passes over the tensor as
    eager PyTorch allows. Matches the autograd path (tested)."""

    @staticmethod
    def forward(ctx, x, c, d, levels: int):
        upper = c + d
        alpha = 0.5 / d
        beta = 0.5 - c * alpha
        # t = q * clamp(T(x), 0, 1): kept for backward, so it never recomputes T
        t = torch.addcmul(beta * levels, x, alpha * levels).clamp_(0.0, levels)
        out = torch.round(t).mul_(upper / levels)
        ctx.levels = levels
        ctx.save_for_backward(t, out, c, d)
        return out

    @staticmethod
    def backward(ctx, g):
        t, out, c, d = ctx.saved_tensors
        q = ctx.levels
        upper = c + d
        alpha = 0.5 / d
        # g inside the interval (0 < t < q), zero where pruned or clipped
        gm = torch.ops.aten.hardtanh_backward(g, t, 0.0, float(q))
        sum_gm = gm.sum()
        sum_gmv = _dot(gm, t) / q  # sum of g * T(x) inside
        sum_gout = _dot(g, out) / upper
        # out = D(T) * (c + d); inside dT/dc = -1/2d and dT/dd = -(T - 1/2)/d; d out/d(c+d) = D
        grad_c = -(upper * alpha) * sum_gm + sum_gout
        grad_d = -(upper / d) * (sum_gmv - 0.5 * sum_gm) + sum_gout
        grad_x = gm.mul_(upper * alpha) if ctx.needs_input_grad[0] else None
        return grad_x, grad_c.reshape(c.shape), grad_d.reshape(d.shape), None


def _channel_sum(t: torch.Tensor, per_channel: bool, axis: int) -> torch.Tensor:
    if not per_channel:
        return t.sum().reshape(1)
    dims = [i for i in range(t.dim()) if i != axis % t.dim()]
    return t.sum(dim=dims)


class _SignedInterval(torch.autograd.Function):
    """Fused weight path (signed, per tensor or per channel, learned or fixed gamma).

    The autograd path builds some twenty small nodes per weight tensor; on CPU their dispatch
    overhead, not arithmetic, dominates (weights are small). One Function with closed-form
    gradients, including LSQ-style gradient scaling and the clamps of ``d`` and ``gamma``,
    does the same in a handful of passes. Matches the autograd path (tested).
    """

    @staticmethod
    def forward(ctx, w, c, d, gamma, levels: int, per_channel: bool, axis: int,
                c_scale, g_scale, gamma_one: bool):
        shape = [1] * w.dim()
        if per_channel and c.numel() > 1:
            shape[axis] = -1
        dc = d.clamp_min(D_MIN)
        cb, db = c.reshape(shape), dc.reshape(shape)
        sgn = torch.sign(w)
        u = (w.abs() - cb).mul_(0.5 / db).add_(0.5)
        # the clamp passes gradient on its closed range; the power's exponent stops at u = 0
        inside = (u >= 0) & (u <= 1) if gamma_one else (u > 0) & (u <= 1)
        uc = u.clamp_(0.0, 1.0)
        g = gamma.clamp_min(GAMMA_MIN)
        v = uc if gamma_one else uc.pow(g.reshape(()))
        r = torch.round(v * levels)
        upper = cb + db
        out = r * sgn * (upper / levels)
        ctx.levels, ctx.per_channel, ctx.axis, ctx.gamma_one = levels, per_channel, axis, gamma_one
        ctx.shape = shape
        ctx.save_for_backward(sgn, uc, v, r, inside, c, d, gamma, c_scale, g_scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        sgn, uc, v, r, inside, c, d, gamma, c_scale, g_scale = ctx.saved_tensors
        q, pc, axis, shape = ctx.levels, ctx.per_channel, ctx.axis, ctx.shape
        dc = d.clamp_min(D_MIN)
        db = dc.reshape(shape)
        upper = c.reshape(shape) + db
        gs = grad * sgn  # gradient with respect to the (non-negative) quantized magnitude
        if ctx.gamma_one:
            dv = gs * inside
        else:
            g = gamma.clamp_min(GAMMA_MIN).reshape(())
            slope = torch.where(uc > 0, v / torch.where(uc > 0, uc, 1.0), 0.0).mul_(g)
            dv = gs * slope * inside
        a = dv * upper  # gradient with respect to u
        grad_w = a * sgn * (0.5 / db) if ctx.needs_input_grad[0] else None
        s1 = _channel_sum(a, pc, axis)
        s2 = _channel_sum(a * uc, pc, axis)
        s3 = _channel_sum(gs * r, pc, axis) / q
        grad_c = (s3 - s1 * (0.5 / dc)) * c_scale
        grad_d = (s3 - (s2 - 0.5 * s1) / dc) * c_scale * (d >= D_MIN)
        grad_g = None
        if ctx.needs_input_grad[3]:
            logu = torch.where(uc > 0, torch.log(torch.where(uc > 0, uc, 1.0)), 0.0)
            gg = (gs * upper * v * logu).sum().reshape(gamma.shape)
            grad_g = gg * g_scale * (gamma >= GAMMA_MIN)
        return (grad_w, grad_c.reshape(c.shape), grad_d.reshape(d.shape), grad_g,
                None, None, None, None, None, None)


@register_quantizer("qil")
class QILQuantizer(SymmetricLevels, Quantizer):
    """Interval quantizer; ``signed=True`` is the weight form, ``signed=False`` the activation form.

    Options (``QuantizerSpec.options``): ``gamma`` (initial exponent, default 1),
    ``learn_gamma`` (train it; the paper does for weights, activations keep 1),
    ``grad_scale`` (scale the gradients of c, d, g by ``1/sqrt(n * q)`` as LSQ does, and those
    of c, d also by the squared initial range ``ref^2``, so one learning rate suits every layer
    and channel; not in the paper, default on), ``fused`` (use the fused
    activation kernel when it applies, default on).
    """

    param_names = ("scale", "zero_point", "c", "d", "gamma")
    derived_params = ("scale", "zero_point")
    required_params = ("c", "d")
    scalar_params = ("gamma",)

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
            raise ConfigError(f"QIL gamma must be positive, got {gamma}")
        self.c = nn.Parameter(torch.full((1,), 0.5))
        self.d = nn.Parameter(torch.full((1,), 0.5))
        self.gamma = nn.Parameter(torch.tensor([float(gamma)]), requires_grad=learn_gamma)
        self.register_buffer("ref", torch.ones(1))
        self.learn_gamma = learn_gamma
        self._gamma_value = float(gamma)
        self.use_grad_scale = grad_scale
        self.fused = fused

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
        self.ref = top.clone()

    def _param_scale(self, x: torch.Tensor) -> float:
        return 1.0 / math.sqrt(x.numel() / self.c.numel() * max(self.levels, 1))

    def _params(self, x: torch.Tensor):
        c, d, gamma = self.c, self.d, self.gamma
        if self.use_grad_scale:
            s = self._param_scale(x)
            # ref^2: an SGD step then moves c and d by the same fraction of each channel's
            # initial range, so nearly-empty channels cannot overshoot and collapse
            c, d = grad_scale(c, s * self.ref.square()), grad_scale(d, s * self.ref.square())
            if self.learn_gamma:
                gamma = grad_scale(gamma, s)
        return c, d.clamp_min(D_MIN), gamma.clamp_min(GAMMA_MIN)

    def _gamma_is_one(self) -> bool:
        # a Python float, so the hot path never reads a tensor back (no device sync)
        return not self.learn_gamma and self._gamma_value == 1.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._gamma_value = float(self.gamma.detach().reshape(-1)[0])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's transformer ``T(x)`` (values in ``[-1, 1]`` signed, ``[0, 1]`` unsigned)."""
        c, d, gamma = self._params(x)
        c, d = self.broadcast(c, x), self.broadcast(d, x)
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
        if self.fused and self._is_signed:
            one = torch.ones((), device=x.device)
            s = self._param_scale(x) if self.use_grad_scale else 1.0
            c_scale = s * self.ref.square() if self.use_grad_scale else one
            return _SignedInterval.apply(
                x, self.c, self.d, self.gamma, q, self.per_channel, self.ch_axis,
                c_scale, one * s, self._gamma_is_one())
        c, d, _ = self._params(x)
        upper = self.broadcast(c + d, x)
        return round_ste(self.transform(x) * q) * (upper / q)

    def scale_zero_point(self):
        """Scale of the output grid ``(c + d) / q`` and zero-point 0 (see the module docstring)."""
        d = self.d.detach().clamp_min(D_MIN)
        scale = (self.c.detach() + d) / self.levels
        return scale, torch.zeros_like(scale)

    def params(self) -> dict[str, torch.Tensor]:
        """The output grid's scale and zero-point (derived), the interval's centre ``c`` and
        half-width ``d`` (per channel or per tensor) and the exponent ``gamma``."""
        return {**super().params(), "c": self.c.detach().clone(), "d": self.d.detach().clone(),
                "gamma": self.gamma.detach().clone()}

    def _load_params(self, params) -> None:
        dev = self.c.device
        c = params.get("c", self.c.detach()).float().to(dev)
        d = params.get("d", self.d.detach()).float().to(dev)
        if "d" in params:
            self._check_positive("d", d)
        if "gamma" in params:
            self._check_positive("gamma", params["gamma"])
        scale = (c + d.clamp_min(D_MIN)) / self.levels
        given = params.get("scale")
        if given is not None and not torch.equal(given.float().to(dev), scale):
            raise ConfigError(f"{self._where()}: a 'qil' scale is (c + d) / {self.levels}, so "
                              f"{given.tolist()} disagrees with c and d; give c and d alone")
        if "zero_point" in params and bool((params["zero_point"] != 0).any()):
            raise ConfigError(f"{self._where()}: a 'qil' zero-point is 0")
        first = not self.calibrated
        for name in ("c", "d", "gamma"):
            if name in params:
                self._store(name, params[name].float(), dev)
        if "gamma" in params:
            self._gamma_value = float(self.gamma.detach().reshape(-1)[0])
        if first:  # the initial width that gradient scaling and collapse are measured against
            self.ref = (self.c.detach() + self.d.detach()).clone()

    @torch.no_grad()
    def integer_form(self, x: torch.Tensor) -> IntegerForm:
        """Codes ``round(T(x) * q)``: ``codes * scale`` equals :meth:`quantize` exactly."""
        self._check_integer_form()
        qmin, qmax = self.qrange
        codes = torch.round(self.transform(x) * self.levels).clamp(qmin, qmax).to(torch.int32)
        scale, zp = self.scale_zero_point()
        return self._form(codes, scale, zp, self._is_signed)

    @torch.no_grad()
    def collapsed(self) -> torch.Tensor:
        """Bool tensor (no sync): the interval has shrunk to nothing or is not finite."""
        bad = (self.d <= (COLLAPSE * self.ref).clamp_min(D_MIN)) | ~torch.isfinite(self.d)
        bad = bad | ~torch.isfinite(self.c)
        return bad.any() | ~torch.isfinite(self.gamma).all()
