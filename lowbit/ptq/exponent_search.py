"""Discrete search of the power-of-two exponents of one reconstruction unit.

A log2 scale learned through a straight-through round changes the exponent only once the
continuous value has crossed a half: after the gradient has pointed the same way for many
steps, and then by a factor of two that no gradient asked for. The neighbouring exponents
are few, so they are simply tried. Each layer's output error is separable by channel for its
weights (an output channel reads only its own filter) and, for a depthwise conv, for its
input channels too, so every channel gets the exponent with the least error on the data the
unit is actually fed, in one pass per candidate.

An asymmetric input grid that reaches below zero (MobileNet's residual stream) also tries its
zero-point shifted by up to three codes for each exponent: with the step fixed to a power of
two, the grid seldom fits the data's range, and where its spare codes go (below the data or
above it) is the choice left. The zero-point moves the lower clipping bound with it, so it
stays an integer through every later step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DEPTHWISE
from ..nn.layers import QConv2d, QLinear, QuantLayerMixin
from ..prepare import type_label
from ..quant.base import Quantizer
from ..quant.pot import choose_exponent
from .blocks import run_chunked

DELTAS = (-1, 1)
ZP_DELTAS = (-3, -2, -1, 1, 2, 3)


def _linear_part(layer: QuantLayerMixin, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QConv2d):
        return layer._conv_forward(x, w, None)
    return F.linear(x, w)


def _channel_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Squared error per output channel (axis 1)."""
    return (out - ref).pow(2).sum([i for i in range(out.dim()) if i != 1])


def _reads_own_channel(layer: QuantLayerMixin) -> bool:
    """A depthwise conv without channel multiplier: output channel c reads input channel c."""
    return (type_label(layer, nn.Conv2d) == DEPTHWISE
            and layer.out_channels == layer.in_channels)


def _best(q: Quantizer, error_of, zero_points: bool = False) -> int:
    """Try ``q``'s exponents shifted by ``DELTAS`` (and, with ``zero_points``, each exponent's
    zero-point shifted by ``ZP_DELTAS``); keep per channel (or per tensor, when ``error_of``
    returns one value) whichever has the least error. Returns the channels changed."""
    start = q.params()
    k0, z0 = start["exponent"], start["zero_point"]
    qmin, qmax = q.qrange
    tried_z: list[torch.Tensor] = []

    def ev() -> torch.Tensor:
        err = error_of()
        return err if err.numel() == k0.numel() else err.sum()  # one choice for all channels

    def error_at(k: torch.Tensor) -> torch.Tensor:
        """The error at exponent ``k``, at the best of its zero-points (recorded)."""
        q.load_params({"exponent": k})
        now = q.params()
        zk, lo = now["zero_point"], now["clip_lo"]
        best_z, best_err = zk, ev()
        for j in ZP_DELTAS if zero_points else ():
            z = (zk + j).clamp(qmin, qmax)
            q.load_params({"zero_point": z, "clip_lo": lo})  # the bound stays where it was
            err = ev()
            better = err < best_err
            best_z = torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
        tried_z.append(best_z)
        return best_err.expand_as(k0)

    best_k, _, pick = choose_exponent(k0, (0, *DELTAS), error_at)
    best_z = torch.stack(tried_z).gather(0, pick.clamp_min(0)[None]).squeeze(0)
    best_z = torch.where(pick >= 0, best_z, z0)
    q.load_params({"exponent": best_k})
    if not torch.equal(q.params()["zero_point"], best_z):
        q.load_params({"zero_point": best_z})
    return int(((best_k != k0) | (best_z != z0)).sum())


def _signed_asymmetric(q: Quantizer) -> bool:
    """An asymmetric grid that reaches below zero: where it sits is a choice the zero-point
    makes, one code at a time, whatever the exponent."""
    return not q.symmetric and bool((q.params()["zero_point"] > q.qrange[0]).any())


@torch.no_grad()
def search_unit_exponents(
    unit: nn.Module, q_args: Sequence, *, images: int = 64, chunk: int = 64
) -> dict[str, int]:
    """Choose, layer by layer in execution order, each power-of-two exponent of ``unit`` among
    its neighbours by the layer's output error on the first ``images`` of ``q_args``.

    Inputs first: ``conv(x_q, W)`` against ``conv(x, W)``, per channel for a depthwise conv
    with per-channel input scales, per tensor otherwise, with the zero-point of a signed
    asymmetric input searched jointly; then weights, per output channel:
    ``conv(x_q, W_q)`` against ``conv(x_q, W)``. Returns the channels changed per quantizer.
    """
    layers = [(n, m) for n, m in unit.named_modules() if isinstance(m, (QConv2d, QLinear))]
    n = next(a.shape[0] for a in q_args if isinstance(a, torch.Tensor))
    m = min(n, images)
    args = tuple(a[:m] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a
                 for a in q_args)
    changed: dict[str, int] = {}
    for lname, layer in layers:
        x = _layer_input(unit, layer, args, m, chunk)
        if x is not None:
            changed.update(_search_layer(lname, layer, x))
    return changed


def _layer_input(unit: nn.Module, layer: nn.Module, args: tuple, n: int,
                 chunk: int) -> torch.Tensor | None:
    """What ``layer`` reads when ``unit`` runs on ``args`` (None if the unit never calls it)."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, inputs: captured.append(inputs[0]))
    try:
        run_chunked(unit, args, {}, n, chunk)
    finally:
        handle.remove()
    return torch.cat(captured) if captured else None


def _search_layer(lname: str, layer: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The input exponents of one layer, then its weight exponents given the quantized input."""
    changed = {}
    wq, iq = layer.weight_quant, layer.input_quant
    if iq is not None and iq.power_of_two:
        ref = _linear_part(layer, x, layer.weight)
        per_channel = (iq.per_channel and iq.params()["exponent"].numel() > 1
                       and iq.ch_axis % x.dim() == 1 and _reads_own_channel(layer))

        def act_error():
            err = _channel_error(_linear_part(layer, iq(x), layer.weight), ref)
            return err if per_channel else err.sum()

        changed[f"{lname}.input_quant".lstrip(".")] = _best(
            iq, act_error, zero_points=_signed_asymmetric(iq))
    if wq is not None and wq.power_of_two:
        xq = layer.quant_input(x)
        ref_q = _linear_part(layer, xq, layer.weight)
        changed[f"{lname}.weight_quant".lstrip(".")] = _best(
            wq, lambda: _channel_error(_linear_part(layer, xq, wq(layer.weight)), ref_q))
    return changed
