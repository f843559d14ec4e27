"""ONNX QCDQ (quantize - clip - dequantize) for onnxruntime, written with ``onnx.helper``.

torch's exporters refuse fake-quant ranges other than 8 bits, so the graph is written from
lowbit's graph and each quantizer's grid directly. Per layer: the input codes in a uint8
container (signed grids shifted by 128) (``QuantizeLinear``; a ``Clip`` to the b-bit code range when b < 8, merged with any
activation clamp), ``DequantizeLinear`` -> ``Conv``/``Gemm`` with int8 weights dequantized per
output channel (explicit ``axis=0``: onnxruntime's default axis 1 mis-scales square convs) and
the int32 bias at ``s_x * s_w``, then ``QuantizeLinear`` onto the grid the integer reference
requantizes to. onnxruntime fuses that pattern into QLinearConv/QGemm; a b-bit container with
a Clip still fuses (its int4 QDQ types would fall back to float).

What has no integer grid (a layer whose output is not requantized before the next op, a
per-channel activation grid, a layer kept float) is written in dequantized float form and listed
in the export report, never dropped. The graph's input is the float tensor the torch model
takes (normalised NCHW, dynamic batch), its output the float output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from ..errors import ExportError
from ..graph.ops import Op, resolve
from .integer import Grid, IntegerModel

OPSET = 21
# onnxruntime's U8S8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) sum pairs of uint8 x
# int8 products in int16 (vpmaddubsw), which saturates once two weight codes exceed 128 in
# magnitude together (255 * 128 = 32640 is the most that is safe); 8-bit weights are then
# written as uint8 around zero-point 128 (U8U8, exact everywhere), weights of 7 bits or fewer
# stay int8.
U8S8_SAFE = 64


@dataclass
class _Float:
    name: str


@dataclass
class _Codes:
    name: str
    grid: Grid
    lo: int
    hi: int


@dataclass
class ExportReport:
    """What was exported as integers, what stayed float and why."""

    integer: list[str] = field(default_factory=list)
    dequantized: dict[str, str] = field(default_factory=dict)
    bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    shifts_only: bool | None = None
    extra: dict = field(default_factory=dict)

    def note_rescaled(self, lf) -> None:
        if lf.bias_rescaled:
            self.extra.setdefault("bias_rescaled", {})[lf.name] = lf.bias_rescaled

    def summary(self) -> str:
        lines = [f"integer layers: {len(self.integer)}"]
        for name in self.integer:
            w, a = self.bits.get(name, ("?", "?"))
            lines.append(f"  {name}: W{w}A{a}")
        for name, why in self.dequantized.items():
            lines.append(f"dequantized (float): {name}: {why}")
        for name, chans in self.extra.get("bias_rescaled", {}).items():
            lines.append(f"weight scale raised so the int32 bias fits: {name}, channels "
                         f"{sorted(chans)} (largest weight change {max(chans.values()):.2g})")
        for name in self.extra.get("unfused_adds", []):
            lines.append(f"add kept unfused (float Sum, exact): {name}: its output zero-point is "
                         "odd, where onnxruntime's QLinearAdd rounds ties differently")
        if self.shifts_only is not None:
            lines.append(f"power-of-two requantization (shifts only): {self.shifts_only}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"integer": self.integer, "dequantized": self.dequantized,
                "bits": {k: list(v) for k, v in self.bits.items()},
                "shifts_only": self.shifts_only, **self.extra}


def _onnx():
    try:
        import onnx
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("ONNX export needs the onnx package: pip install lowbit[export]") \
            from None
    return onnx


class _Writer:
    fused_add_ties = True  # see add_node

    def __init__(self, im: IntegerModel, example: torch.Tensor, int8_weights: bool = False):
        self.int8_weights = int8_weights
        self.onnx = _onnx()
        self.h = self.onnx.helper
        self.im = im
        self.nodes: list = []
        self.inits: list = []
        self.counter = 0
        self.report = ExportReport()
        self.shapes = _shapes(im, example)

    # -- small builders --------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base.replace('.', '_')}_{self.counter}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def container(self, grid: Grid):
        return np.uint8

    def grid_consts(self, grid: Grid, base: str) -> tuple[str, str, dict]:
        dtype = self.container(grid)
        per_channel = grid.scale.numel() > 1
        scale = grid.scale.numpy().astype(np.float32)
        zp = (grid.zero_point + _offset(grid)).numpy().astype(dtype)
        if not per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        attrs = {"axis": 1} if per_channel else {}
        return self.const(base + "_scale", scale), self.const(base + "_zp", zp), attrs

    # -- value conversions -----------------------------------------------------------------
    def quantize(self, v, grid: Grid, base: str) -> _Codes | _Float:
        if isinstance(v, _Codes):
            if v.grid.same(grid):
                return v
            v = self.as_float(v)
        if grid.scale.numel() > 1:
            return self.fake_quantize(v, grid, base)
        s, z, attrs = self.grid_consts(grid, base + "_q")
        out = self.node("QuantizeLinear", [v.name, s, z], base + "_q", **attrs)
        return _Codes(out, grid, grid.qmin + _offset(grid), grid.qmax + _offset(grid))

    def fake_quantize(self, v: _Float, grid: Grid, base: str) -> _Float:
        """A per-channel grid in float ops (Div, Round half to even, Add, Clip, Sub, Mul):
        onnxruntime would fuse a per-axis QuantizeLinear into kernels that take one
        zero-point only, and fail; this runs everywhere and rounds as the integer model."""
        shape = (1, -1, 1, 1)
        s = self.const(base + "_pc_scale", grid.scale.numpy().astype(np.float32).reshape(shape))
        z = self.const(base + "_pc_zp", grid.zero_point.numpy().astype(np.float32).reshape(shape))
        lo = self.const(base + "_pc_lo", np.array(grid.qmin, np.float32))
        hi = self.const(base + "_pc_hi", np.array(grid.qmax, np.float32))
        q = self.node("Round", [self.node("Div", [v.name, s], base + "_div")], base + "_round")
        q = self.node("Clip", [self.node("Add", [q, z], base + "_addzp"), lo, hi], base + "_clip")
        return _Float(self.node("Mul", [self.node("Sub", [q, z], base + "_subzp"), s],
                                base + "_fq"))

    def materialize(self, v: _Codes) -> str:
        """The codes tensor with its pending Clip (b-bit range and clamps) applied."""
        info = np.iinfo(self.container(v.grid))
        if (v.lo, v.hi) == (info.min, info.max):
            return v.name
        dtype = self.container(v.grid)
        lo = self.const("clip_lo", np.array(v.lo, dtype=dtype))
        hi = self.const("clip_hi", np.array(v.hi, dtype=dtype))
        name = self.node("Clip", [v.name, lo, hi], "clip")
        v.name, v.lo, v.hi = name, int(info.min), int(info.max)
        return name

    def as_float(self, v) -> _Float:
        if isinstance(v, _Float):
            return v
        codes = self.materialize(v)
        s, z, attrs = self.grid_consts(v.grid, "dq")
        return _Float(self.node("DequantizeLinear", [codes, s, z], "dq", **attrs))

    def requant_out(self, node: fx.Node, y: _Float, base: str):
        q = self.im.targets.get(node)
        if q is None:
            return y
        return self.quantize(y, Grid.of(q), base)

    def add_node(self, op: Op, a: str, b: str) -> str:
        """``a + b`` as Add, or as Sum where onnxruntime's fusion would round differently.

        onnxruntime fuses DequantizeLinear -> Add -> QuantizeLinear into QLinearAdd, whose x86
        kernel adds the output zero-point before rounding half to even: at an exact tie (common
        on power-of-two grids) with an odd zero-point it lands one code off QuantizeLinear's
        ``round(x / s) + z``, and the error grows with depth. Sum is not fused; its float ops
        follow the ONNX definition (exact on power-of-two grids) at the cost of two more
        passes over the tensor."""
        q = self.im.targets.get(op.node) if self.fused_add_ties else None
        grid = Grid.of(q) if q is not None else None
        odd = grid is not None and grid.scale.numel() == 1 \
            and int(grid.zero_point.reshape(()) + _offset(grid)) % 2 == 1
        if odd:
            self.report.extra.setdefault("unfused_adds", []).append(op.name)
        return self.node("Sum" if odd else "Add", [a, b], op.name)

    def weight(self, lf, name: str) -> str:
        """Weight codes dequantized per output channel (axis 0): int8, or uint8 with
        zero-point 128 where a code exceeds :data:`U8S8_SAFE` (see there) unless
        ``int8_weights``."""
        codes = lf.weight_codes
        shifted = not self.int8_weights and bool((codes.abs() > U8S8_SAFE).any())
        dtype, zp = (np.uint8, 128) if shifted else (np.int8, 0)
        w = self.const(name + "_w", (codes + zp).numpy().astype(dtype))
        ws = self.const(name + "_w_scale", lf.weight_scale.numpy().astype(np.float32))
        wz = self.const(name + "_w_zp", np.full(codes.shape[0], zp, dtype))
        return self.node("DequantizeLinear", [w, ws, wz], name + "_wdq", axis=0)

    def bias(self, lf, name: str) -> str:
        """The int32 bias at ``s_x * s_w``, dequantized per output channel."""
        b = self.const(name + "_b", lf.bias.numpy().astype(np.int32))
        bs = self.const(name + "_b_scale", lf.acc_scale.numpy().astype(np.float32))
        bz = self.const(name + "_b_zp", np.zeros(lf.bias.numel(), np.int32))
        return self.node("DequantizeLinear", [b, bs, bz], name + "_bdq", axis=0)

    # -- ops -------------------------------------------------------------------------------
    def layer(self, op: Op, v):
        lf = self.im.layers[op.name]
        mod = op.module
        x = self.quantize(v, lf.input_grid, op.name)
        xf = self.as_float(x)
        inputs = [xf.name, self.weight(lf, op.name)]
        if lf.bias is not None:
            inputs.append(self.bias(lf, op.name))
        if isinstance(mod, nn.Conv2d):
            y = self.node("Conv", inputs, op.name, **_conv_attrs(mod))
        else:
            y = self.node("Gemm", inputs, op.name, transB=1)
        out = self.requant_out(op.node, _Float(y), op.name)
        self.report.bits[op.name] = (mod.w_bits, mod.a_bits)
        why = None
        target = self.im.targets.get(op.node)
        if lf.input_grid.scale.numel() > 1:
            why = "per-channel activation scales (onnxruntime has no per-channel QLinearConv input)"
        elif target is not None and Grid.of(target).scale.numel() > 1:
            why = "its output grid has per-channel scales (written as float ops)"
        elif isinstance(out, _Float):
            why = ("its output is not requantized before the next op (no output grid): insert "
                   "output/add quantization points (lowbit.nn.points) to run it on integers")
        if why:
            self.report.dequantized[op.name] = why
        else:
            self.report.integer.append(op.name)
        self.report.note_rescaled(lf)
        return out

    def qadd(self, op: Op, a, b):
        """Passthrough inputs enter on their own grids (QLinearAdd takes one per input)."""
        grid = Grid.of(op.module.quant)
        fs = []
        for v, through, tag in zip((a, b), op.module.passthrough, "ab", strict=True):
            on_grid = through and isinstance(v, _Codes)
            fs.append(self.as_float(v if on_grid else self.quantize(v, grid, op.name + "_" + tag)))
        y = _Float(self.add_node(op, fs[0].name, fs[1].name))
        return self.requant_out(op.node, y, op.name)

    def add(self, op: Op, a, b):
        both = isinstance(a, _Codes) and isinstance(b, _Codes)
        y = _Float(self.add_node(op, self.as_float(a).name, self.as_float(b).name))
        out = self.requant_out(op.node, y, op.name)
        if not (both and isinstance(out, _Codes)):
            self.report.dequantized[op.name] = (
                "residual add in float: its inputs or output have no shared integer grid "
                "(a QAdd point, lowbit.nn.points, gives them one)")
        return out

    def clamp(self, op: Op, v):
        lo, hi = op.attrs["lo"], op.attrs["hi"]
        if isinstance(v, _Codes) and v.grid.scale.numel() == 1 and not isinstance(hi, torch.Tensor) \
                and self.integer_clamps:
            s, z = float(v.grid.scale), int(v.grid.zero_point) + _offset(v.grid)
            if lo is not None:
                v.lo = max(v.lo, z + int(torch.round(torch.tensor(lo / s, dtype=torch.float64))))
            if hi is not None:
                v.hi = min(v.hi, z + int(torch.round(torch.tensor(hi / s, dtype=torch.float64))))
            return _Codes(v.name, v.grid, v.lo, v.hi)
        if isinstance(hi, torch.Tensor) and isinstance(v, _Codes) and v.grid.scale.numel() == 1:
            s = v.grid.scale.double()  # bounds onto the grid, as the integer model clamps codes
            hi = (torch.round(hi.double() / s) * s).float()
        x = self.as_float(v)
        if isinstance(hi, torch.Tensor):
            zero = self.const("zero", np.zeros((), np.float32))
            up = self.const("upper", hi.numpy().astype(np.float32).reshape(1, -1, 1, 1))
            return _Float(self.node("Min", [self.node("Max", [x.name, zero], "max"), up], "min"))
        if lo == 0.0 and hi is None:
            return _Float(self.node("Relu", [x.name], op.name))
        ins = [x.name, self.const("lo", np.array(lo, np.float32)) if lo is not None else "",
               self.const("hi", np.array(hi, np.float32)) if hi is not None else ""]
        return _Float(self.node("Clip", ins, op.name))

    def avgpool(self, op: Op, v):
        x = self.as_float(v)
        if op.attrs["global"]:
            y = self.node("GlobalAveragePool", [x.name], op.name)
        else:
            a = op.attrs
            y = self.node("AveragePool", [x.name], op.name, kernel_shape=list(a["kernel"]),
                          strides=list(a["stride"]), pads=list(a["padding"]) * 2,
                          count_include_pad=1)
        out = self.requant_out(op.node, _Float(y), op.name)
        if op.attrs.get("squeeze"):
            out = self.on_tensor(out, lambda n: self.node("Flatten", [n], "flatten", axis=1))
        return out

    def on_tensor(self, v, make):
        """Apply a type-agnostic op (reshape, slice, pad...) to codes or floats alike."""
        if isinstance(v, _Codes):
            return _Codes(make(self.materialize(v)), v.grid, v.lo, v.hi)
        return _Float(make(v.name))

    def maxpool(self, op: Op, v):
        a = op.attrs
        return self.on_tensor(v, lambda n: self.node(
            "MaxPool", [n], op.name, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
            pads=list(a["padding"]) * 2))

    def flatten(self, op: Op, v):
        start, end = op.attrs["start"], op.attrs["end"]
        rank = len(self.shapes[op.args[0]])
        if end not in (-1, rank - 1):
            raise ExportError(f"{op.name}: flatten that keeps trailing dims is not exported")
        return self.on_tensor(v, lambda n: self.node("Flatten", [n], op.name, axis=start % rank))

    def reshape(self, op: Op, v, shape):
        dims = [0 if isinstance(d, _Batch) else int(d) for d in shape]
        c = self.const("shape", np.array(dims, np.int64))
        return self.on_tensor(v, lambda n: self.node("Reshape", [n, c], op.name))

    integer_clamps = True  # clamps on codes become a Clip of the integer tensor

    def pad(self, op: Op, v):
        pad = list(op.attrs["pad"])
        rank = len(self.shapes[op.args[0]])
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):
            d = rank - 1 - i
            begins[d], ends[d] = pad[2 * i], pad[2 * i + 1]
        pads = self.const("pads", np.array(begins + ends, np.int64))
        if isinstance(v, _Codes):
            if not self.integer_clamps:  # QONNX: float values on the grid; zeros stay on it
                return _Codes(self.node("Pad", [v.name, pads], op.name), v.grid, v.lo, v.hi)
            if v.grid.scale.numel() > 1:
                v = self.as_float(v)
            else:
                value = self.const("pad_value", np.array(
                    int(v.grid.zero_point) + _offset(v.grid), self.container(v.grid)))
                name = self.node("Pad", [self.materialize(v), pads, value], op.name)
                return _Codes(name, v.grid, v.lo, v.hi)
        return _Float(self.node("Pad", [v.name, pads], op.name))

    def slice(self, op: Op, v):
        idx = op.attrs["index"]
        idx = idx if isinstance(idx, tuple) else (idx,)
        starts, ends, axes, steps = [], [], [], []
        for axis, s in enumerate(idx):
            if s is Ellipsis:
                raise ExportError(f"{op.name}: slicing with ... is not exported")
            if s == slice(None):
                continue
            starts.append(s.start or 0)
            ends.append(s.stop if s.stop is not None else 2**62)
            axes.append(axis)
            steps.append(s.step or 1)
        cs = [self.const(n, np.array(a, np.int64)) for n, a in
              (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
        return self.on_tensor(v, lambda n: self.node("Slice", [n, *cs], op.name))

    def concat(self, op: Op, parts):
        """Codes on one grid concatenate as they are. On different grids, with a per-tensor
        grid the concat is requantized onto (as in the integer reference), float inputs are
        quantized onto it and the codes go DequantizeLinear -> Concat -> QuantizeLinear,
        which onnxruntime fuses into one QLinearConcat; otherwise in float, listed."""
        dim = op.attrs["dim"]
        q = self.im.targets.get(op.node)
        grid = Grid.of(q) if q is not None else None
        if grid is not None and grid.scale.numel() == 1:
            parts = [v if isinstance(v, _Codes) else self.quantize(v, grid, f"{op.name}_{i}")
                     for i, v in enumerate(parts)]
        first = parts[0]
        if all(isinstance(v, _Codes) for v in parts) and all(v.grid.same(first.grid)
                                                              for v in parts):
            name = self.node("Concat", [self.materialize(v) for v in parts], op.name, axis=dim)
            return _Codes(name, first.grid, *self._range(first.grid))
        y = _Float(self.node("Concat", [self.as_float(v).name for v in parts], op.name,
                             axis=dim))
        if grid is not None and grid.scale.numel() == 1:
            return self.quantize(y, grid, op.name)
        self.report.dequantized[op.name] = ("concat of inputs on different grids (in float; "
                                            "give them one grid to concatenate codes)")
        return y

    def _range(self, grid: Grid) -> tuple[int, int]:
        info = np.iinfo(self.container(grid))
        return int(info.min), int(info.max)

    def pixel_shuffle(self, op: Op, v):
        if isinstance(v, _Codes) and v.grid.scale.numel() > 1:
            v = self.as_float(v)
        return self.on_tensor(v, lambda n: self.node("DepthToSpace", [n], op.name,
                                                     blocksize=op.attrs["factor"], mode="CRD"))

    def upsample(self, op: Op, v):
        f = float(op.attrs["factor"])
        scales = self.const("scales", np.array([1.0, 1.0, f, f], np.float32))
        return self.on_tensor(v, lambda n: self.node(
            "Resize", [n, "", scales], op.name, mode="nearest",
            coordinate_transformation_mode="asymmetric", nearest_mode="floor"))

    def float_fn(self, op: Op, x, weight, bias=None, *rest):
        """``F.conv2d`` with constant weights (EDSR's mean shifts), in float."""
        node = op.node
        names = ["stride", "padding", "dilation", "groups"]
        vals = dict(zip(names, rest, strict=False)) | dict(node.kwargs)
        if not isinstance(weight, torch.Tensor) or not (bias is None
                                                        or isinstance(bias, torch.Tensor)):
            raise ExportError(f"{op.name}: conv2d is exported with constant weights only")
        stride, pad, dil = (_pair_of(vals.get(n, d)) for n, d in
                            (("stride", 1), ("padding", 0), ("dilation", 1)))
        ins = [self.as_float(x).name, self.const(op.name + "_w", weight.numpy())]
        if bias is not None:
            ins.append(self.const(op.name + "_b", bias.numpy()))
        self.report.dequantized[op.name] = "kept float (conv2d with constant weights)"
        return _Float(self.node("Conv", ins, op.name, kernel_shape=list(weight.shape[2:]),
                                strides=list(stride), pads=list(pad) * 2, dilations=list(dil),
                                group=int(vals.get("groups", 1))))

    def float_module(self, op: Op, v):
        mod = op.module
        x = self.as_float(v)
        self.report.dequantized[op.name] = f"kept float ({type(mod).__name__})"
        if type(mod).__name__ == "MeanShift":  # a fixed 1x1 conv held in buffers
            ins = [x.name, self.const(op.name + "_w", mod.weight.detach().numpy()),
                   self.const(op.name + "_b", mod.bias.detach().numpy())]
            return _Float(self.node("Conv", ins, op.name, kernel_shape=[1, 1]))
        if isinstance(mod, nn.Conv2d):
            ins = [x.name, self.const(op.name + "_w", mod.weight.detach().numpy())]
            if mod.bias is not None:
                ins.append(self.const(op.name + "_b", mod.bias.detach().numpy()))
            return _Float(self.node("Conv", ins, op.name, **_conv_attrs(mod)))
        if isinstance(mod, nn.Linear):
            ins = [x.name, self.const(op.name + "_w", mod.weight.detach().numpy())]
            if mod.bias is not None:
                ins.append(self.const(op.name + "_b", mod.bias.detach().numpy()))
            return _Float(self.node("Gemm", ins, op.name, transB=1))
        g = mod.weight.detach() if mod.affine else torch.ones_like(mod.running_mean)
        b = mod.bias.detach() if mod.affine else torch.zeros_like(mod.running_mean)
        ins = [x.name] + [self.const(op.name + k, t.numpy().astype(np.float32)) for k, t in
                          (("_g", g), ("_b", b), ("_m", mod.running_mean),
                           ("_v", mod.running_var))]
        return _Float(self.node("BatchNormalization", ins, op.name, epsilon=mod.eps))

    # -- the walk --------------------------------------------------------------------------
    def write(self):
        h, tp = self.h, self.onnx.TensorProto
        env: dict = {}
        inputs, output = [], None
        for op in self.im.ops:
            if op.kind == "input":
                if inputs:
                    raise ExportError("ONNX export takes models with one input tensor")
                shape = list(self.shapes[op.node])
                env[op.node] = _Float("input")
                inputs.append(h.make_tensor_value_info("input", tp.FLOAT, ["batch", *shape[1:]]))
                continue
            if op.kind == "output":
                output = op.args[0]
                break
            env[op.node] = self.step(op, env)
        res = env[output]
        if not isinstance(res, (_Float, _Codes)):
            raise ExportError("ONNX export takes models with one output tensor")
        final = self.as_float(res).name
        self.nodes.append(h.make_node("Identity", [final], ["output"], name="output"))
        out_shape = list(self.shapes[output])
        outputs = [h.make_tensor_value_info("output", tp.FLOAT, ["batch", *out_shape[1:]])]
        graph = h.make_graph(self.nodes, "lowbit", inputs, outputs, self.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in self.opsets],
                             producer_name="lowbit")
        model.ir_version = 10
        if self.check:
            self.onnx.checker.check_model(model, full_check=True)
        return model

    opsets = (("", OPSET),)
    check = True

    def step(self, op: Op, env: dict):
        args = [resolve(a, env) for a in op.args]
        k = op.kind
        if k == "size":
            shape = [_Batch()] + list(self.shapes[op.args[0]][1:])
            return shape[args[1]] if len(args) > 1 else shape
        if k == "getitem" and isinstance(args[0], list):
            return args[0][op.attrs["index"]]
        if k == "reshape":
            return self.reshape(op, args[0], [resolve(s, env) for s in op.attrs["shape"]])
        handler = {"layer": self.layer, "qadd": self.qadd,
                   "quant": lambda op, v: self.quantize(v, Grid.of(op.module), op.name), "add": self.add, "clamp": self.clamp,
                   "avgpool": self.avgpool, "maxpool": self.maxpool, "flatten": self.flatten,
                   "pad": self.pad, "slice": self.slice, "float": self.float_module,
                   "concat": self.concat, "pixel_shuffle": self.pixel_shuffle,
                   "upsample": self.upsample, "float_fn": self.float_fn,
                   "const": lambda op: op.attrs["value"],
                   "identity": lambda op, v: v}.get(k)
        if handler is None:
            raise ExportError(f"{op.name}: {k!r} is not written to ONNX")
        return handler(op, *args)


def _pair_of(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _offset(grid: Grid) -> int:
    """Activation codes travel in uint8 (onnxruntime's fast U8S8 kernels): a signed grid's
    codes and zero-point move up by 128, the real values stay the same."""
    return 128 if grid.signed else 0


class _Batch:
    """The dynamic batch dimension (``size(0)``): reshapes copy it (ONNX shape value 0)."""


def _conv_attrs(mod: nn.Conv2d) -> dict:
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise ExportError(f"conv padding {mod.padding!r}/{mod.padding_mode!r} is not exported; "
                          "use explicit integer zero padding")
    ph, pw = mod.padding
    return {"kernel_shape": list(mod.kernel_size), "strides": list(mod.stride),
            "pads": [ph, pw, ph, pw], "dilations": list(mod.dilation), "group": mod.groups}


def _shapes(im: IntegerModel, example: torch.Tensor) -> dict:
    """Static shapes of every node on the example (batch dim included)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.GraphModule(im.model, im.graph)
    ShapeProp(gm).propagate(example)
    shapes = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node.name] = tuple(meta.shape)
    return {n: shapes[n.name] for n in im.graph.nodes if n.name in shapes}


QONNX_DOMAIN = "qonnx.custom_op.general"


class _QonnxWriter(_Writer):
    """QONNX: every grid is a ``Quant`` node with the true bit-width, signedness and narrow
    range (what FINN and hls4ml read); values between them are float on the grid."""

    opsets = (("", OPSET), (QONNX_DOMAIN, 1))
    check = False  # the checker does not know the Quant op's domain
    fused_add_ties = False
    integer_clamps = False

    def quant(self, x: str, scale: np.ndarray, zp: np.ndarray, bits: int, signed: bool,
              narrow: bool, base: str) -> str:
        ins = [x, self.const(base + "_scale", scale.astype(np.float32)),
               self.const(base + "_zp", zp.astype(np.float32)),
               self.const(base + "_bits", np.array(bits, np.float32))]
        out = self.fresh(base + "_quant")
        self.nodes.append(self.h.make_node("Quant", ins, [out], name=out, domain=QONNX_DOMAIN,
                                           signed=int(signed), narrow=int(narrow),
                                           rounding_mode="ROUND"))
        return out

    def quantize(self, v, grid: Grid, base: str) -> _Codes:
        if isinstance(v, _Codes) and v.grid.same(grid):
            return v
        x = self.as_float(v).name
        scale, zp = grid.scale.numpy(), grid.zero_point.numpy()
        if scale.size > 1:
            scale, zp = scale.reshape(1, -1, 1, 1), zp.reshape(1, -1, 1, 1)
        else:
            scale, zp = scale.reshape(()), zp.reshape(())
        narrow = grid.signed and grid.bits > 1 and grid.qmin > -(2 ** (grid.bits - 1))
        out = self.quant(x, scale, zp, grid.bits, grid.signed, narrow, base)
        return _Codes(out, grid, grid.qmin, grid.qmax)

    def materialize(self, v: _Codes) -> str:
        return v.name

    def as_float(self, v) -> _Float:
        return v if isinstance(v, _Float) else _Float(v.name)

    def weight(self, lf, name: str) -> str:
        form = lf.weight_form
        shape = [-1] + [1] * (lf.weight_codes.dim() - 1)
        scale = lf.weight_scale.reshape(shape)
        w = self.const(name + "_w", (lf.weight_codes.double() * scale.double()).float().numpy())
        binary = form.bits == 1 and form.signed
        return self.quant(w, scale.numpy(), np.zeros(()), form.bits, form.signed,
                          form.narrow_range and not binary, name + "_w")

    def bias(self, lf, name: str) -> str:
        """The int32 bias values as float (exact): a 32-bit Quant would block qonnx's QCDQ
        conversion, which stops at 8 bits."""
        return self.const(name + "_b", (lf.bias.double() * lf.acc_scale.double()).float().numpy())


def _write(writer: type[_Writer], qmodel: nn.Module, example: torch.Tensor,
           im: IntegerModel | None, **options):
    im = im or IntegerModel(qmodel)
    with torch.no_grad():
        w = writer(im, example.detach().cpu(), **options)
        model = w.write()
    w.report.shifts_only = im.power_of_two or None
    return model, w.report


def to_qonnx(qmodel: nn.Module, example: torch.Tensor, im: IntegerModel | None = None):
    """The QONNX model (Quant nodes with the true bit-widths) and its :class:`ExportReport`."""
    return _write(_QonnxWriter, qmodel, example, im)


def to_onnx(qmodel: nn.Module, example: torch.Tensor, im: IntegerModel | None = None, *,
            int8_weights: bool = False):
    """The ONNX QCDQ model (an ``onnx.ModelProto``) and its :class:`ExportReport`.
    ``int8_weights`` writes 8-bit weights as int8 too (onnxruntime's U8S8 kernels, as its
    ``quantize_static`` does): fastest, exact on CPUs with VNNI, saturating on x86 without."""
    return _write(_Writer, qmodel, example, im, int8_weights=int8_weights)
