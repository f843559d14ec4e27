"""Autograd pieces shared by every quantizer.

Kept in one small module so that each quantizer composes the same straight-through and
gradient-scaling behaviour instead of re-deriving it.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, pass the gradient straight through (identity backward)."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor with a straight-through gradient."""
    return x + (torch.floor(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Return ``x`` unchanged in the forward pass, with its gradient multiplied by ``scale``.

    LSQ uses this to keep the step-size gradient on the same footing as the weight gradients.
    """
    return (x - x * scale).detach() + x * scale


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient everywhere (use sparingly: it hides clipping)."""
    return x + (x.clamp(lo, hi) - x).detach()


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without the product tensor where both have the same contiguous layout
    (standard or channels_last), so a flat view pairs their elements."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    cl = torch.channels_last
    if a.dim() == 4 and a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl):
        return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return (a * b).sum()


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Uniform affine fake quantization with straight-through rounding.

    ``zero_point`` is integer-valued (held as a float tensor so it broadcasts); values that
    clip get zero gradient with respect to ``x`` and a gradient through ``scale`` (as in LSQ).
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (int32) of ``x``: ``clamp(round(x / scale) + zero_point)``."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return q.to(torch.int32)


class _FixedFakeQuant(torch.autograd.Function):
    """Fake quantization with fixed scale/zero-point: a few in-place passes in the forward and
    the saved unclamped codes for the straight-through backward.

    It is bit-exact with :func:`quantize_to_int` on the reciprocal scale (same operations in
    the same order), and with ``torch.fake_quantize_per_tensor_affine`` wherever that kernel's
    reciprocal is the same float (power-of-two scales always). On a CPU it is faster than
    that kernel (torch 2.13), most with the backward pass; it saves the codes as floats, four
    times the memory of torch's boolean mask.
    """

    @staticmethod
    def forward(ctx, x, inv_scale, scale, zero_point, qmin, qmax):
        q = torch.mul(x, inv_scale).round_().add_(zero_point)
        if not ctx.needs_input_grad[0]:
            return q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
        # the unclamped codes are integers, so "qmin <= q <= qmax" is the strict range test
        # of hardtanh_backward at half-integers: one pass, no boolean mask to convert
        ctx.save_for_backward(q)
        ctx.bounds = (qmin - 0.5, qmax + 0.5)
        return q.clamp(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        gx = torch.ops.aten.hardtanh_backward(grad, q, *ctx.bounds)
        return gx, None, None, None, None, None


def fixed_fake_quant(
    x: torch.Tensor,
    inv_scale: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Fake-quantize with non-learned parameters (broadcastable to ``x``); STE gradient for ``x``."""
    return _FixedFakeQuant.apply(x, inv_scale, scale, zero_point, qmin, qmax)


class _LearnedFakeQuant(torch.autograd.Function):
    """Fake quantization whose scale and zero-point receive LSQ gradients, computed in closed
    form instead of through a chain of autograd nodes (one saved tensor instead of five).

    With ``v = x / s`` and ``q = clamp(round(v) + z)``: ``dy/dx`` is 1 inside the range, 0
    outside; ``dy/ds = (q - z) - v`` inside and ``q - z`` outside; ``dy/dz`` is 0 inside and
    ``-s`` outside (the zero-point's rounding is straight-through).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        v = x / scale
        q = torch.round(v).add_(zero_point)
        inside = (q >= qmin) & (q <= qmax)
        q.clamp_(qmin, qmax).sub_(zero_point)
        ctx.save_for_backward(inside, q - v * inside, scale)
        ctx.shapes = (scale.shape, zero_point.shape)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, dyds, scale = ctx.saved_tensors
        s_shape, z_shape = ctx.shapes
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = (grad * dyds).sum_to_size(s_shape) if ctx.needs_input_grad[1] else None
        gz = None
        if ctx.needs_input_grad[2]:
            gz = (grad * ~inside).sum_to_size(z_shape).mul_(scale).neg_().reshape(z_shape)
        return gx, gs, gz, None, None


def learned_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Fake-quantize with trainable ``scale`` (and ``zero_point``), LSQ gradients for both."""
    return _LearnedFakeQuant.apply(x, scale, zero_point, qmin, qmax)


class _BinaryFakeQuant(torch.autograd.Function):
    """Binary weights ``s * sign(x)`` with ``sign(0) = +1``.

    ``dy/ds = sign(x)`` is exact (the output is linear in ``s``), times ``grad_factor`` (LSQ's
    gradient scale, applied here rather than by :func:`grad_scale` so that the forward output
    is exactly ``±s`` and matches the integer form bit for bit); ``dy/dx`` is the
    straight-through estimate clipped to ``|x| <= s`` (the hardtanh STE of BinaryConnect and
    XNOR-Net), so weights far outside the binary range stop being pushed further out.
    """

    @staticmethod
    def forward(ctx, x, scale, grad_factor):
        pos = x >= 0
        ctx.save_for_backward(pos, x.abs() <= scale if ctx.needs_input_grad[0] else None)
        ctx.s_shape, ctx.grad_factor = scale.shape, grad_factor
        return torch.where(pos, scale, -scale)

    @staticmethod
    def backward(ctx, grad):
        pos, inside = ctx.saved_tensors
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = torch.where(pos, grad, -grad).sum_to_size(ctx.s_shape).mul_(ctx.grad_factor)
        return gx, gs, None


def binary_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, grad_factor: float = 1.0
) -> torch.Tensor:
    """Binary fake quantization with a trainable positive ``scale`` (broadcastable to ``x``)
    whose gradient is multiplied by ``grad_factor``."""
    return _BinaryFakeQuant.apply(x, scale, grad_factor)


def binary_codes(x: torch.Tensor) -> torch.Tensor:
    """Binary integer codes (int32): +1 where ``x >= 0``, else -1 (matches the forward pass)."""
    return torch.where(x >= 0, 1, -1).to(torch.int32)
