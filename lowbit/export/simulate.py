"""Bit-exact simulation: the fake-quant model with the integer model's arithmetic at every
quantization point.

The default simulation rounds ``float32(conv(x_q, w_q) + bias) / s_out``; the integer model
rounds ``int32 accumulator * m * 2**-n``. Near a tie the two can land one code apart, and the
difference carries on. :func:`bit_exact` returns a module that runs the fake-quant model's graph
on float tensors (the real values, as the simulation does) and runs every op that is not a
quantization point with the model's own torch ops (activations, pools, pads, reshapes, pixel
shuffle, upsampling). At the points it mirrors integer arithmetic: the layer's input
codes from its own quantizer, the bias as int32 at ``s_x * s_w``, exact accumulation, and
requantization by the dyadic multiplier with the integer reference's one rounding rule (half
to even); average pools sum codes exactly and fold ``1 / N`` into the multiplier; adds without
a quantization point add int32 accumulators as the integer model does, and concatenations
of integer values requantize them as it does. With the quantization
points inserted (:func:`lowbit.nn.points.insert_points`) its codes at every layer equal the
integer reference's bit for bit, with or without the quantization points
(:func:`lowbit.nn.points.insert_points`); the default simulation differs from both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExportError
from ..graph.ops import COMMUTING, Op
from .integer import (
    Grid,
    IntegerModel,
    IntValue,
    _add,
    _avgpool,
    layer_output,
    qadd,
    requantize,
)

# ops that move values without changing them: a value on a grid stays on that grid
GRID_KEEPING = COMMUTING | {"concat", "pixel_shuffle", "upsample"}


@dataclass
class _Real:
    """A float tensor of real values; ``grid`` when they lie on a quantizer's grid."""

    value: torch.Tensor
    grid: Grid | None = None


def _plain(v):
    if isinstance(v, _Real):
        return v.value
    if isinstance(v, IntValue):
        return v.real()
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(a) for a in v)
    return v


def _resolve(a, env: dict):
    from torch import fx

    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, (tuple, list)):
        return type(a)(_resolve(x, env) for x in a)
    return a


class BitExact(nn.Module):
    """The bit-exact simulation of a calibrated lowbit model (see the module docstring).

    ``forward`` takes and returns what the model does; ``layer_inputs`` holds, after each call,
    every quantized layer's input codes. Evaluation only (no gradients flow through rounding)."""

    def __init__(self, qmodel: nn.Module):
        super().__init__()
        self.qmodel = qmodel
        self.im = IntegerModel(qmodel)
        self.layer_inputs: dict[str, torch.Tensor] = {}

    # -- codes and accumulators --------------------------------------------------------------
    def _codes(self, v, q) -> IntValue:
        """``v`` as codes on ``q``'s grid: a float by the quantizer's own rounding (exact for
        values already on that grid), an accumulator by dyadic requantization."""
        grid = Grid.of(q)
        if isinstance(v, IntValue):
            return v if v.grid is not None and v.grid.same(grid) else requantize(v, grid)
        form = q.integer_form(_plain(v))
        return IntValue(form.codes.to(torch.int64), grid.scale.to(form.codes.device),
                        grid.zero_point.to(form.codes.device), grid)

    def _on_grid(self, v: _Real) -> IntValue:
        g = v.grid
        s, z = g.scale.to(v.value.device), g.zero_point.to(v.value.device)
        iv = IntValue(torch.zeros(1, dtype=torch.int64), s, z, g)
        codes = torch.round(v.value.double() / iv.per_dim1(s.double())) + iv.per_dim1(z)
        iv.data = codes.to(torch.int64)
        return iv

    def _emit(self, op: Op, acc: IntValue):
        """An accumulator is requantized where the integer model does (its target)."""
        q = self.im.targets.get(op.node)
        if q is None:
            return acc
        codes = requantize(acc, Grid.of(q))
        return _Real(codes.real(), codes.grid)

    def _int(self, v) -> IntValue | None:
        if isinstance(v, IntValue):
            return v
        if isinstance(v, _Real) and v.grid is not None:
            return self._on_grid(v)
        return None

    # -- the walk ------------------------------------------------------------------------------
    def _step(self, op: Op, env: dict):
        k = op.kind
        args = [_resolve(a, env) for a in op.args]
        if k == "layer":
            lf = self.im.layers[op.name]
            x = self._codes(args[0], op.module.input_quant)
            self.layer_inputs[op.name] = x.data
            q = self.im.targets.get(op.node)
            out = layer_output(lf, x, None if q is None else Grid.of(q))
            return out if q is None else _Real(out.real(), out.grid)
        if k == "qadd":
            ins = [self._int(v) if t and self._int(v) is not None else v
                   for v, t in zip(args, op.module.passthrough, strict=True)]
            out = qadd(op, ins, lambda v, g, q: self._codes(v, q), self.im.targets.get(op.node),
                       self.im.stats)
            return _Real(out.real(), out.grid) if out.grid is not None else out
        if k == "quant":
            c = self._codes(args[0], op.module)
            return _Real(c.real(), c.grid)
        if k == "avgpool":
            x = self._int(args[0])
            if x is not None:
                return self._emit(op, _avgpool(op, x))
        if k == "const":
            return op.attrs["value"]
        if k in COMMUTING and args and isinstance(args[0], IntValue):
            return self.im._step(op, env)  # an accumulator through clamps, pools, pads
        if k == "add":
            a, b = (self._int(v) for v in args[:2])
            if a is not None and b is not None:
                return self._emit(op, _add(a, b, self.im.stats))
        if k == "concat":
            parts = [self._int(v) for v in args[0]]
            if all(v is not None for v in parts):  # requantized as the integer model does
                out = self.im._concat(op, parts)
                return out if out.grid is None else _Real(out.real(), out.grid)
        return self._torch(op, env, args)

    def _torch(self, op: Op, env: dict, args):
        """Any other op: the model's own torch op on the float values."""
        node = op.node
        pa = tuple(_plain(_resolve(a, env)) for a in node.args)
        kw = {k: _plain(_resolve(v, env)) for k, v in node.kwargs.items()}
        if node.op == "call_module":
            out = self.im.modules[node.target](*pa, **kw)
        elif node.op == "call_function":
            out = node.target(*pa, **kw)
        elif node.op == "call_method":
            out = getattr(pa[0], node.target)(*pa[1:], **kw)
        else:
            raise ExportError(f"{node.name}: {node.op} nodes are not simulated")
        if not isinstance(out, torch.Tensor):
            return out
        first = args[0] if args else None
        if op.kind == "concat":  # on a grid only when all parts share one
            grids = [v.grid if isinstance(v, _Real) else None for v in first]
            same = all(g is not None and g.same(grids[0]) for g in grids)
            return _Real(out, grids[0] if same else None)
        keep = op.kind in GRID_KEEPING and isinstance(first, _Real) and first.grid is not None
        return _Real(out, first.grid if keep else None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layer_inputs = {}
        self.im.stats.multipliers.clear()
        env: dict = {}
        for op in self.im.ops:
            if op.kind == "input":
                env[op.node] = _Real(x)
            elif op.kind == "output":
                return _plain(env[op.args[0]])
            else:
                env[op.node] = self._step(op, env)
        raise ExportError("the graph has no output")


def bit_exact(qmodel: nn.Module) -> BitExact:
    """The bit-exact simulation of a calibrated model: ``bit_exact(q)(x)`` is what the integer
    model computes, as floats, bit for bit."""
    from .api import check_calibrated

    check_calibrated(qmodel)
    return BitExact(qmodel)


@torch.no_grad()
def agreement(qmodel: nn.Module, x: torch.Tensor, sim: nn.Module | None = None) -> dict:
    """Per quantized layer, how the input codes of a simulation (default: the fake-quant model
    itself; or a :class:`BitExact`) differ from the integer reference's on ``x``: elements
    compared, fraction off, fraction off by exactly one code, largest difference. ``"all"``
    sums over layers."""
    im = IntegerModel(qmodel)
    im.run(x)
    if isinstance(sim, BitExact):
        sim(x)
        got = sim.layer_inputs
    else:
        got = {}
        handles = []
        for name in im.layers:
            def hook(m, inputs, n=name):
                got[n] = m.input_quant.integer_form(inputs[0]).codes.to(torch.int64)

            handles.append(qmodel.get_submodule(name).register_forward_pre_hook(hook))
        try:
            (sim or qmodel)(x)
        finally:
            for h in handles:
                h.remove()
    out, tot = {}, {"n": 0, "off": 0, "one": 0, "max": 0}
    for name, ref in im.stats.layer_inputs.items():
        d = (ref - got[name].to(ref.device)).abs()
        r = {"n": d.numel(), "off": int((d > 0).sum()), "one": int((d == 1).sum()),
             "max": int(d.max())}
        for key in ("n", "off", "one"):
            tot[key] += r[key]
        tot["max"] = max(tot["max"], r["max"])
        out[name] = r
    out["all"] = tot
    for r in out.values():
        r["off_frac"] = r["off"] / max(r["n"], 1)
        r["one_frac"] = r["one"] / max(r["n"], 1)
    return out
