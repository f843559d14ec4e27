"""Concat (on one grid and on different grids), pixel shuffle and nearest upsampling: integer
reference, bit-exact simulation, onnxruntime and QONNX agree; EDSR exports."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.export import agreement, bit_exact
from lowbit.export.integer import Grid, IntegerModel, IntValue, requantize
from tests.test_export import _ort, on_grid, quantized


class Mixer(nn.Module):
    """Two branches concatenated (different grids), a pixel shuffle between convs, nearest
    upsampling, a concat of a tensor with itself (one grid) and a residual add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 16, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.d = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.e = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        y = self.d(self.ps(self.c(y)))
        y = torch.relu(y + nn.functional.interpolate(self.a(x)[:, :, ::2, ::2], scale_factor=4))
        return self.e(torch.cat([self.up(y)[:, :, ::2, ::2], y], 1))


@pytest.mark.parametrize("points", [True, False])
@pytest.mark.parametrize("config", ["w8a8", "w4a4", "pot_w4a8"])
def test_concat_shuffle_upsample_run_on_integers(config, points, tmp_path):
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(Mixer, config, points=points, size=8)
    xs = on_grid(q, x[16:])
    ref = IntegerModel(q).run(xs)
    assert agreement(q, xs, bit_exact(q))["all"]["off"] == 0
    assert torch.equal(bit_exact(q)(xs), ref)
    model, report = to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    if points:
        assert torch.equal(got, ref)
        assert ops.count("QLinearConv") == 6 and "DepthToSpace" in ops and "Resize" in ops, ops
    else:
        assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()  # float parts: near ties


def test_qonnx_runs_concat_shuffle_upsample():
    pytest.importorskip("qonnx")
    from lowbit.export.api import run_qonnx
    from lowbit.export.onnx_qdq import to_qonnx

    q, x = quantized(Mixer, "w4a4", size=8)
    model, _ = to_qonnx(q, x[:2])
    xs = on_grid(q, x[16:])
    assert torch.equal(run_qonnx(model, xs), IntegerModel(q).run(xs))


def test_bilinear_upsampling_is_refused_by_name():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return nn.functional.interpolate(self.c(x), scale_factor=2, mode="bilinear")

    with pytest.raises(lowbit.errors.ExportError, match="nearest by one integer factor"):
        q, _ = quantized(Bilinear, "w8a8", points=False, size=8)
        IntegerModel(q)


def _edsr_quantized(points=True):
    from lowbit.models.edsr import EDSR
    from lowbit.nn.points import insert_points

    torch.manual_seed(0)
    model = EDSR(scale=2, n_blocks=2, channels=8).eval()
    x = torch.rand(12, 3, 12, 12) * 255
    q = lowbit.prepare(model, lowbit.QuantConfig.uniform(8, 8), x[:2])
    if points:
        q, _ = insert_points(q)
    lowbit.calibrate(q, [x[:8]], progress=False)
    return q, x


def test_edsr_exports_and_onnxruntime_matches_the_integer_reference(tmp_path):
    """Mean shifts (float), residual blocks, the long skip and PixelShuffle: every conv is a
    QLinearConv; outputs within one code of the integer reference (onnxruntime rounds the
    float32 product of a near-tie accumulator the other way now and then, and the residual
    stream spreads it)."""
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = _edsr_quantized()
    model, report = to_onnx(q, x[:2])
    assert set(report.dequantized) == {"conv2d", "conv2d_1"}  # the two mean shifts
    sess, ops = _ort(model, tmp_path)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in q.modules())
    assert ops.count("QLinearConv") == n_conv and "DepthToSpace" in ops, ops
    got = torch.from_numpy(sess.run(None, {"input": x[8:].numpy()})[0])
    ref = IntegerModel(q).run(x[8:])
    step = max(float(m.params()["scale"]) for n, m in q.named_modules()
               if n.startswith("outq") and "." not in n)  # the output grid's step is the largest
    d = (got - ref).abs()
    assert float(d.max()) <= step * 1.001 and float((d > 1e-4).double().mean()) < 0.02
    assert torch.equal(bit_exact(q)(x[8:]), ref)


def test_cli_exports_a_saved_edsr_folder(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from lowbit.cli import main
    from lowbit.models import get_model
    from lowbit.pipeline import save_quantized

    model = get_model("edsr_small_x2", "builtin")
    x = torch.rand(2, 3, 48, 48) * 255
    q = lowbit.prepare(model, lowbit.QuantConfig.uniform(8, 8), x)
    lowbit.calibrate(q, [x], progress=False)
    save_quantized(q, tmp_path / "saved", {"model": "edsr_small_x2", "weights": "builtin"})
    assert main(["export", "--quantized", str(tmp_path / "saved"),
                 "-o", str(tmp_path / "edsr.onnx")]) == 0
    out = capsys.readouterr().out
    assert "integer layers: 9" in out and "kept float (conv2d with constant weights)" in out
    assert "residual add in float" in out  # without --points the adds stay float, listed
    assert (tmp_path / "edsr.onnx").is_file()


class Joined(nn.Module):
    """Two branches concatenated along channels, through a max pool (which commutes with
    rounding) into a conv; that conv's output concatenated along height with a third branch,
    into the last conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.e = nn.Conv2d(3, 4, 1)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        y = self.c(nn.functional.max_pool2d(y, 2))
        z = torch.cat([y, self.e(nn.functional.max_pool2d(x, 2))], dim=2)
        return self.d(z)


@pytest.mark.parametrize("points", [True, False])
@pytest.mark.parametrize("config", ["w8a8", "w4a4", "pot_w4a8"])
def test_concat_of_different_grids_requantizes_each_input(config, points, tmp_path):
    """Each input is requantized onto the grid the concat goes to: onnxruntime runs it as
    QLinearConcat (inputs on their own grids) or as a Concat of codes (accumulators
    requantized in their QLinearConv); nothing about the concats is float."""
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(Joined, config, points=points, size=8)
    xs = on_grid(q, x[16:])
    im = IntegerModel(q)
    ref = im.run(xs)
    assert torch.equal(bit_exact(q)(xs), ref)
    assert agreement(q, xs, bit_exact(q))["all"]["off"] == 0
    assert not im.stats.float_ops
    assert im.stats.shifts_only() == (config == "pot_w4a8")
    model, report = to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    assert ops.count("QLinearConv") == 5 - (not points)  # the last conv has no output grid
    if points:
        grids = [Grid.of(q.get_submodule(f"outq{i}")) for i in range(4)]
        assert not grids[0].same(grids[1]) and not grids[2].same(grids[3])
        assert not report.dequantized and ops.count("QLinearConcat") == 2, ops
        assert torch.equal(got, ref)
    else:
        assert set(report.dequantized) == {"d"} and ops.count("Concat") == 2, ops
        assert torch.allclose(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_qonnx_runs_concat_of_different_grids():
    pytest.importorskip("qonnx")
    from lowbit.export.api import run_qonnx
    from lowbit.export.onnx_qdq import to_qonnx

    q, x = quantized(Joined, "w4a4", size=8)
    model, report = to_qonnx(q, x[:2])
    xs = on_grid(q, x[16:])
    assert not report.dequantized
    assert torch.equal(run_qonnx(model, xs), IntegerModel(q).run(xs))


def _run_onnx(nodes, consts: dict, inputs: dict, out_shape) -> torch.Tensor:
    """A hand-written uint8 QDQ graph run by onnxruntime (fully optimised): ``consts`` maps
    names to numpy arrays, ``inputs`` names to uint8 arrays; returns the uint8 output."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    h, u8 = onnx.helper, onnx.TensorProto.UINT8
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, u8, list(a.shape))
                                      for n, a in inputs.items()],
                         [h.make_tensor_value_info("y", u8, list(out_shape))],
                         [onnx.numpy_helper.from_array(a, n) for n, a in consts.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, inputs)[0].astype(np.int64))


@settings(max_examples=30, deadline=None)
@given(exponents=st.lists(st.integers(-12, 0), min_size=3, max_size=3),
       zero_points=st.lists(st.integers(0, 255), min_size=3, max_size=3))
def test_onnxruntime_qlinearconcat_shifts_power_of_two_grids_as_the_reference(exponents,
                                                                              zero_points):
    """What onnxruntime fuses DequantizeLinear -> Concat -> QuantizeLinear into, on every
    uint8 code, against the reference's requantization: equal on power-of-two grids (a
    shift). Its table rounds ``float32(s_i * (c - z_i)) / s``, so other grids can differ from
    the dyadic rule at exact ties (docs/export.md)."""
    pytest.importorskip("onnx")
    from onnx import helper as h

    scales = [np.float32(2.0**e) for e in exponents]
    zps = [np.uint8(z) for z in zero_points]
    consts = {"sa": scales[0], "za": zps[0], "sb": scales[1], "zb": zps[1], "s": scales[2],
              "z": zps[2]}
    nodes = [h.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             h.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             h.make_node("Concat", ["fa", "fb"], ["c"], axis=1),
             h.make_node("QuantizeLinear", ["c", "s", "z"], ["y"])]
    codes = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)
    got = _run_onnx(nodes, consts, {"a": codes, "b": codes}, (1, 2, 256))
    out = Grid(torch.tensor([float(scales[2])]), torch.tensor([zero_points[2]]), 8, False, 0,
               255, None, True)
    for i in range(2):
        v = IntValue(torch.arange(256).reshape(1, 1, 256), torch.tensor([float(scales[i])]),
                     torch.tensor([zero_points[i]]))
        assert torch.equal(got[:, i:i + 1], requantize(v, out).data)


def test_onnxruntime_requantizes_a_conv_in_float32_and_misses_a_near_tie():
    """Why onnxruntime is off the integer reference on EDSR (docs/export.md): its QLinearConv
    rounds ``float32(acc) * M`` in float32. Here ``acc * M = 148.50000478...`` exactly, whose
    float32 product is 148.5, a tie rounded to even; the exact value rounds to 149."""
    pytest.importorskip("onnx")
    from fractions import Fraction

    from onnx import helper as h

    from lowbit.export.integer import dyadic, scale_round

    m = np.float32(0.0016643877606838942)  # s_x; s_w = s_out = 1, so M = s_x
    acc = 2 * 1 + 89220  # input code 2, weight code 1, int32 bias
    consts = {"sx": m, "zx": np.uint8(0), "w": np.ones((1, 1, 1, 1), np.int8),
              "sw": np.ones(1, np.float32), "zw": np.zeros(1, np.int8),
              "b": np.array([89220], np.int32), "sb": np.array([m]),
              "zb": np.zeros(1, np.int32), "s": np.float32(1), "z": np.uint8(0)}
    nodes = [h.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             h.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0),
             h.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], axis=0),
             h.make_node("Conv", ["xf", "wf", "bf"], ["yf"], kernel_shape=[1, 1]),
             h.make_node("QuantizeLinear", ["yf", "s", "z"], ["y"])]
    got = _run_onnx(nodes, consts, {"x": np.full((1, 1, 1, 1), 2, np.uint8)}, (1, 1, 1, 1))
    exact = Fraction(acc) * Fraction(float(m))
    assert round(exact) == 149 and np.float32(acc) * m == np.float32(148.5)
    mult, shift = dyadic(torch.tensor([float(m)]))
    assert scale_round(torch.tensor([acc]), mult, shift).item() == 149  # the reference
    assert got.item() == 148
