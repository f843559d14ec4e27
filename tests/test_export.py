"""Export: the integer reference, ONNX QCDQ run by onnxruntime, packed weights, bad input."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import CalibrationError, ConfigError, ExportError, OutputError
from lowbit.export.integer import (
    IntegerModel,
    code_agreement,
    dyadic,
    requant_agreement,
    shift_round,
)
from lowbit.export.packed import pack_codes, read_packed, unpack_codes
from lowbit.nn.points import BiasQuant, QAdd, calibrate_points, insert_points
from lowbit.quant import UniformQuantizer
from lowbit.quant.base import int_range
from tests.helpers import calibrated, randomize_bn


class Plain(nn.Module):
    """conv-ReLU, depthwise conv-BN-ReLU6, max pool, 1x1 conv, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.mp = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = nn.functional.relu6(self.bn(self.dw(torch.relu(self.c1(x)))))
        x = torch.relu(self.c3(self.mp(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    """Two residual blocks (identity, and strided with an option-A shortcut), avg pool 2x2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.ap = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        short = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = torch.relu(self.bn(self.b2(torch.relu(self.b1(x)))) + short)
        return self.fc(self.ap(x).flatten(1))


class Padded(nn.Module):
    """TF-style "SAME" padding as an explicit ZeroPad2d before a strided depthwise conv (as in
    MobileNetV2), a channel of dead weights with a large bias, and a residual module add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.c2.weight[3] = 0.0
            self.c2.bias[3] = 50.0

    def forward(self, x):
        y = nn.functional.relu6(self.dw(self.pad(nn.functional.relu6(self.c1(x)))))
        y = y + self.c2(y)
        return self.fc(y.mean((2, 3)))


CONFIGS = {
    "w8a8": lambda: lowbit.QuantConfig.uniform(8, 8),
    "w4a4": lambda: lowbit.QuantConfig.uniform(4, 4),
    "w3a5": lambda: lowbit.QuantConfig.uniform(3, 5, first_last="same"),
    "pot_w4a8": lambda: lowbit.QuantConfig.uniform(4, 8, kind="pot"),
}


def quantized(model_cls, config, points=True, size=16):
    torch.manual_seed(0)
    model = randomize_bn(model_cls())
    x = torch.randn(24, 3, size, size)
    q = lowbit.prepare(model, CONFIGS[config](), x[:2])
    if points:
        q, _ = insert_points(q)
    lowbit.calibrate(q, [x[:16]], progress=False)
    return q, x


def on_grid(q, x):
    """The input snapped onto the first quantizer's grid, so that onnxruntime's QuantizeLinear
    (x / s) and lowbit's (x * (1 / s)) cannot round a tie differently: the integer pipeline
    after it is what is compared."""
    first = next(m for m in q.modules() if isinstance(m, lowbit.nn.QuantLayerMixin)).input_quant
    return first.integer_form(x).dequantize()


# -- the integer arithmetic -----------------------------------------------------------------

@settings(max_examples=60)
@given(mult=st.floats(2.0**-20, 256.0, allow_nan=False, width=32),
       values=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8))
def test_dyadic_requantization_rounds_exactly_half_to_even(mult, values):
    m, n = dyadic(torch.tensor([mult]))
    assert Fraction(int(m)) * Fraction(2) ** -int(n) == Fraction(mult)  # exact decomposition
    p = torch.tensor(values, dtype=torch.int64)
    got = shift_round(p * m, n).tolist()
    want = [round(Fraction(v) * Fraction(mult)) for v in values]  # Python rounds half to even
    assert got == want


def test_power_of_two_multipliers_are_shifts():
    m, n = dyadic(torch.tensor([2.0**-7, 1.0, 8.0, 0.75]))
    assert m.tolist() == [1, 1, 1, 3] and n.tolist() == [7, 0, -3, 2]


def test_integer_form_carries_narrow_range_and_exponent():
    w = torch.randn(4, 9)
    pot = calibrated(lowbit.quant.PoTQuantizer, w, bits=4, signed=True, per_channel=True,
                     narrow_range=True)
    form = pot.integer_form(w)
    assert form.power_of_two and form.narrow_range and form.qrange == (-7, 7)
    assert torch.equal(form.scale, torch.pow(2.0, form.exponent.float()))
    uni = calibrated(UniformQuantizer, w, bits=4, signed=True)
    assert uni.integer_form(w).exponent is None and uni.integer_form(w).qrange == (-8, 7)
    qil = calibrated(lowbit.quant.QILQuantizer, w, bits=3, signed=True)
    assert qil.integer_form(w).narrow_range  # QIL's signed grid is symmetric


def test_a_kind_without_integer_form_says_so():
    class Mixture(UniformQuantizer):
        kind = "mixture"
        has_integer_form = False

    q = calibrated(Mixture, torch.randn(10), bits=4)
    with pytest.raises(ConfigError, match="no integer form"):
        q.integer_form(torch.randn(10))


# -- integer reference against the simulation -----------------------------------------------

@pytest.mark.parametrize("config", ["w8a8", "w4a4", "pot_w4a8"])
def test_points_make_the_simulation_agree_with_the_integer_model(config):
    q, x = quantized(Residual, config)
    agree = code_agreement(q, x[16:])
    off = max(v["off"] for v in agree.values())
    assert off <= 0.01 and max(v["max"] for v in agree.values()) <= 2, agree
    y_int, y_sim = IntegerModel(q).run(x[16:]), q(x[16:])
    assert torch.equal(y_int.argmax(1), y_sim.argmax(1))


@pytest.mark.parametrize("config", ["w8a8", "w4a4"])
def test_default_simulation_is_close_to_the_integer_model(config):
    q, x = quantized(Plain, config, points=False)
    agree = code_agreement(q, x[16:])
    assert agree["c1"]["off"] == 0.0  # the input codes are the simulation's own
    assert all(v["max"] <= 1 for v in agree.values()), agree
    if config == "w8a8":  # at 4 bits the float bias against int32 at s_x * s_w shifts more
        assert all(v["off"] < 0.05 for v in agree.values()), agree
    local = requant_agreement(q, x[16:])  # each requantization on the simulation's input
    assert set(local) == {"c1", "dw"}  # c3 and fc are not requantized straight into a layer
    assert all(v["max"] <= 1 and v["off"] < 0.01 for v in local.values()), local


def test_power_of_two_models_requantize_by_shifts_only():
    q, x = quantized(Residual, "pot_w4a8")
    im = IntegerModel(q)
    im.run(x)
    assert im.power_of_two and im.stats.shifts_only() and im.stats.multipliers
    q, x = quantized(Residual, "w8a8")
    im = IntegerModel(q)
    im.run(x)
    assert not im.stats.shifts_only()


# -- ONNX ----------------------------------------------------------------------------------

def _ort(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("model_cls", [Plain, Residual, Padded])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_onnxruntime_equals_the_integer_reference(model_cls, config, tmp_path):
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(model_cls, config)
    model, report = to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    xs = on_grid(q, x[16:])
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    assert torch.equal(got, IntegerModel(q).run(xs))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in q.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in q.modules())
    assert ops.count("QLinearConv") == n_conv, ops
    assert ops.count("QGemm") + ops.count("QLinearMatMul") == n_linear, ops
    assert "Conv" not in ops and "Gemm" not in ops and "MatMul" not in ops
    assert not report.dequantized and len(report.integer) == n_conv + n_linear
    if model_cls is Residual:
        assert ops.count("QLinearAdd") == 2 and "QLinearAveragePool" in ops


def test_onnx_graph_is_valid_with_dynamic_batch_and_axis_0_weights(tmp_path):
    onnx = pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import OPSET, to_onnx

    q, x = quantized(Residual, "w4a4")
    model, _ = to_onnx(q, x[:2])
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == OPSET == 21
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    inits = {i.name for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in inits and n.input[0].split("_")[-2] == "w"]
    assert weight_dq and all(a.name == "axis" and a.i == 0 for n in weight_dq for a in n.attribute)
    sess, _ = _ort(model, tmp_path)
    for batch in (1, 5):
        assert sess.run(None, {"input": x[:batch].numpy()})[0].shape == (batch, 4)


class NearDead(Residual):
    """A stem channel with weights a million times smaller than the others: its accumulator
    scale is tiny, and int32 residual adds must still not overflow."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.stem.weight[2] *= 1e-6


@pytest.mark.parametrize("model_cls", [Residual, NearDead])
def test_without_points_the_unfused_parts_are_listed_and_still_correct(model_cls, tmp_path):
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(model_cls, "w8a8", points=False)
    model, report = to_onnx(q, x[:2])
    assert "fc" in report.dequantized and "a2" in report.dequantized
    assert any("add" in k for k in report.dequantized)
    sess, _ = _ort(model, tmp_path)
    xs = on_grid(q, x[16:])
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    ref = IntegerModel(q).run(xs)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_power_of_two_onnx_scales_are_powers_of_two():
    pytest.importorskip("onnx")
    from onnx import numpy_helper

    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(Plain, "pot_w4a8")
    model, report = to_onnx(q, x[:2])
    assert report.shifts_only
    scales = [numpy_helper.to_array(i) for i in model.graph.initializer if "scale" in i.name]
    for s in scales:
        mant = torch.frexp(torch.from_numpy(s.copy()).reshape(-1))[0]
        assert bool((mant == 0.5).all())


# -- packed weights --------------------------------------------------------------------------

@settings(max_examples=40)
@given(bits=st.sampled_from([1, 2, 4, 8]), signed=st.booleans(), n=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_packed_codes_round_trip_exactly(bits, signed, n, seed):
    binary = signed and bits == 1
    qmin, qmax = int_range(bits, signed)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmax + 1, (n,), generator=g)
    if binary:
        codes = torch.where(codes > 0, 1, -1)
    packed = pack_codes(codes, bits, qmin, binary)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * (1 if binary else bits) // 8)
    assert torch.equal(unpack_codes(packed, (n,), bits, qmin, binary), codes.to(torch.int32))


def test_packed_export_round_trips_and_halves_with_bits(tmp_path):
    from safetensors.torch import load_file

    sizes = {}
    for config in ("w8a8", "w3a5"):  # w3a5 quantizes every layer: 4-bit containers
        q, x = quantized(Plain, config, points=False)
        out = tmp_path / config
        report = lowbit.export(q, x[:2], "packed", out)
        codes = read_packed(out)
        for name, lf in IntegerModel(q).layers.items():
            assert torch.equal(codes[f"{name}.weight"], lf.weight_form.codes)
        stored = load_file(str(out / "weights.safetensors"))
        sizes[config] = sum(t.numel() for k, t in stored.items() if k.endswith(".weight"))
        assert report.extra["format"] == "packed"
    n_first = 8 * 3 * 3 * 3  # the first layer stays 8 bit in w8a8 only
    assert sizes["w3a5"] <= (sizes["w8a8"] + n_first) / 2 + 8


def test_int_export_holds_multipliers_and_shifts(tmp_path):
    from safetensors.torch import load_file

    q, x = quantized(Plain, "pot_w4a8", points=False)
    lowbit.export(q, x[:2], "int", tmp_path / "m")
    t = load_file(str(tmp_path / "m" / "weights.safetensors"))
    assert t["c1.weight"].dtype == torch.int8 and t["c1.bias"].dtype == torch.int32
    assert bool((t["c1.multiplier"] == 1).all())  # power of two: a shift


# -- points ----------------------------------------------------------------------------------

def test_points_are_off_by_default_and_keep_state_dict_names():
    torch.manual_seed(0)
    model = randomize_bn(Residual())
    x = torch.randn(8, 3, 16, 16)
    q = lowbit.prepare(model, CONFIGS["w8a8"](), x[:2])
    keys = set(q.state_dict())
    assert not any(isinstance(m, (QAdd, BiasQuant)) for m in q.modules())
    p, report = insert_points(q)
    assert keys <= set(p.state_dict()) and len(report.adds) == 2
    assert sum(isinstance(m, QAdd) for m in p.modules()) == 2
    assert set(report.outputs.values()) >= {"fc", "relu"}  # the logits, the stem after ReLU
    lowbit.calibrate(p, [x], progress=False)
    with lowbit.float_mode(p):
        assert torch.allclose(p(x), model(x), atol=1e-5)


def test_points_calibrate_alone_on_a_calibrated_model():
    q, x = quantized(Residual, "w8a8", points=False)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    p, report = insert_points(q)
    calibrate_points(p, report, [x[:16]])
    after = p.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(qz.calibrated for qz in report.new_quantizers(p))


# -- bad input -------------------------------------------------------------------------------

def test_bad_input_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    raw = lowbit.prepare(Plain().eval(), CONFIGS["w8a8"](), x[:2])
    with pytest.raises(CalibrationError, match="not calibrated"):
        lowbit.export(raw, x, "int", tmp_path / "a")
    q, _ = quantized(Plain, "w8a8", points=False)
    with pytest.raises(ConfigError, match="unknown export format"):
        lowbit.export(q, x, "tflite", tmp_path / "b")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        lowbit.export(q, x, "onnx", blocker / "m.onnx")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    with pytest.raises(OutputError, match="is not empty"):
        lowbit.export(q, x, "packed", full)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ConfigError, match=r"lowbit\[export\]"):
        lowbit.export(q, x, "onnx", tmp_path / "c.onnx")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_unknown_ops_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.act = nn.SiLU()

        def forward(self, x):
            return torch.sigmoid(self.act(self.c(x)))

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    q = lowbit.prepare(Odd(), CONFIGS["w8a8"](), x[:2])
    lowbit.calibrate(q, [x], progress=False)
    with pytest.raises(ExportError, match="'act' .SiLU. is not known"):
        IntegerModel(q)


def test_forward_hooks_are_refused():
    q, x = quantized(Plain, "w8a8", points=False)
    q.get_submodule("c3").register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ExportError, match="'c3' has forward hooks"):
        IntegerModel(q)


def test_cli_exports_a_saved_folder(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import example_input, save_quantized

    spec = get_spec("digits_cnn")
    ex = example_input(spec, 8).normal_()
    q = lowbit.prepare(get_model("digits_cnn"), CONFIGS["w4a4"](), ex)
    lowbit.calibrate(q, [ex], progress=False)
    save_quantized(q, tmp_path / "saved", {"model": "digits_cnn", "weights": None})
    assert main(["export", "--quantized", str(tmp_path / "saved"), "--format", "packed",
                 "-o", str(tmp_path / "out")]) == 0
    assert "integer layers: 4" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert main(["export", "--quantized", str(tmp_path), "--format", "int",
                 "-o", str(tmp_path / "x")]) == 2
    assert "not a folder written by 'lowbit ptq --save'" in capsys.readouterr().err
    assert main(["export", "--quantized", str(tmp_path / "saved"), "--format", "int",
                 "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "x").exists()
    if pytest.importorskip("onnxruntime"):
        assert main(["export", "--quantized", str(tmp_path / "saved"), "--points",
                     "--calib-size", "32", "-o", str(tmp_path / "m.onnx")]) == 0
        assert "quantization points: 0 QAdd, 2 output grids, 4 int32 biases" \
            in capsys.readouterr().out
        assert main(["export", "--quantized", str(tmp_path / "saved"),
                     "-o", str(tmp_path / "m2.onnx")]) == 0
        assert "onnxruntime against the integer reference on the example: max |diff| 0" \
            in capsys.readouterr().out
        assert main(["export", "--quantized", str(tmp_path / "saved"), "--format", "int",
                     "--int8-weights", "-o", str(tmp_path / "y")]) == 2
        assert "--int8-weights applies to --format onnx only" in capsys.readouterr().err
        assert main(["export", "--quantized", str(tmp_path / "saved"), "--int8-weights",
                     "--no-check", "-o", str(tmp_path / "m3.onnx")]) == 0
        import onnx
        from onnx import numpy_helper

        def containers(path):  # the 8-bit containers of conv/linear weights
            arrays = [numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer]
            return [a for a in arrays if a.ndim > 1 and a.dtype in (np.int8, np.uint8)]

        weights, shifted = containers(tmp_path / "m3.onnx"), containers(tmp_path / "m2.onnx")
        assert weights and all(w.dtype == np.int8 for w in weights)
        assert any(w.dtype == np.uint8 for w in shifted)  # the 8-bit first/last layers


# -- QONNX -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_cls", [Plain, Residual])
@pytest.mark.parametrize("config", ["w8a8", "w3a5", "pot_w4a8"])
def test_qonnx_executes_and_matches_the_integer_reference(model_cls, config):
    pytest.importorskip("qonnx")
    from lowbit.export.api import run_qonnx
    from lowbit.export.onnx_qdq import QONNX_DOMAIN, to_qonnx

    q, x = quantized(model_cls, config)
    model, report = to_qonnx(q, x[:2])
    xs = on_grid(q, x[16:])
    assert torch.equal(run_qonnx(model, xs), IntegerModel(q).run(xs))
    quants = [n for n in model.graph.node if n.op_type == "Quant"]
    assert quants and all(n.domain == QONNX_DOMAIN for n in quants)
    inits = {i.name: i for i in model.graph.initializer}
    from onnx import numpy_helper

    bits = {float(numpy_helper.to_array(inits[n.input[3]])) for n in quants}
    w_bits = {3.0} if config == "w3a5" else ({8.0, 4.0} if "w4" in config else {8.0})
    assert w_bits <= bits  # weights carry their true bit-width, not the int8 container's


def test_qonnx_converts_to_qcdq_and_runs_on_onnxruntime():
    pytest.importorskip("qonnx")
    ort = pytest.importorskip("onnxruntime")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ

    from lowbit.export.onnx_qdq import to_qonnx

    q, x = quantized(Residual, "pot_w4a8")  # qonnx converts zero-point-0 grids only
    model, _ = to_qonnx(q, x[:2])
    qcdq = ModelWrapper(model).transform(QuantToQCDQ()).model
    assert "Quant" not in {n.op_type for n in qcdq.graph.node}
    so = ort.SessionOptions()  # qonnx writes 8-bit weights as int8: no fusion into the U8S8
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # kernels,
    sess = ort.InferenceSession(qcdq.SerializeToString(), so,  # which saturate without VNNI
                                providers=["CPUExecutionProvider"])
    xs = on_grid(q, x[16:])
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    assert torch.equal(got, IntegerModel(q).run(xs))


def test_qonnx_export_file(tmp_path):
    pytest.importorskip("qonnx")
    q, x = quantized(Plain, "w4a4")
    report = lowbit.export(q, x[:2], "qonnx", tmp_path / "m.qonnx.onnx")
    assert (tmp_path / "m.qonnx.onnx").is_file()
    assert report.extra["runtime_vs_integer_max_abs"] <= 1e-6


def test_per_channel_activation_scales_export_dequantized_and_listed(tmp_path):
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    torch.manual_seed(0)
    model = randomize_bn(Plain())
    x = torch.randn(24, 3, 16, 16)
    q = lowbit.prepare(model, lowbit.QuantConfig.uniform(8, 8, dw_act_per_channel=True), x[:2])
    lowbit.calibrate(q, [x[:16]], progress=False)
    assert q.get_submodule("dw").input_quant.per_channel
    model_proto, report = to_onnx(q, x[:2])
    assert "per-channel" in report.dequantized["dw"] and "per-channel" in report.dequantized["c1"]
    sess, _ = _ort(model_proto, tmp_path)
    xs = on_grid(q, x[16:])
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    ref = IntegerModel(q).run(xs)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_channel_clamp_from_rescaling_exports(tmp_path):
    """ReLU6 turned into per-channel bounds by power-of-two rescaling (ChannelClamp)."""
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx
    from lowbit.nn import ChannelClamp

    class Clamped(Plain):
        def __init__(self):
            super().__init__()
            self.cc = ChannelClamp(torch.linspace(1.0, 6.0, 8))

        def forward(self, x):
            x = self.cc(self.bn(self.dw(torch.relu(self.c1(x)))))
            return self.fc(torch.flatten(self.pool(torch.relu(self.c3(self.mp(x)))), 1))

    q, x = quantized(Clamped, "w8a8")
    model, report = to_onnx(q, x[:2])
    sess, _ = _ort(model, tmp_path)
    xs = on_grid(q, x[16:])
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    assert torch.equal(got, IntegerModel(q).run(xs)) and not report.dequantized


def test_a_bias_too_large_for_int32_widens_that_channels_weight_grid(tmp_path):
    class Tiny(Plain):
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                self.c3.weight[5] *= 1e-7  # near dead, with a bias a billion times larger
                self.c3.bias[5] = 3.0

    q, x = quantized(Tiny, "w8a8")
    lf = IntegerModel(q).layers["c3"]
    assert list(lf.bias_rescaled) == [5] and lf.bias_rescaled[5] < 1e-6
    assert int(lf.bias.abs().max()) <= 2**31 - 1
    report = lowbit.export(q, x[:2], "packed", tmp_path / "p")
    assert "c3" in report.extra["bias_rescaled"] and "int32 bias fits" in report.summary()
    assert torch.equal(read_packed(tmp_path / "p")["c3.weight"], lf.weight_form.codes)


@pytest.mark.parametrize("config", ["w8a8", "pot_w4a8"])
def test_residual_stream_enters_qlinearadd_without_requantization(config, tmp_path):
    """QAdd passes the stream (already on an output point's grid) through, so onnxruntime
    fuses everything: one QuantizeLinear (the input) and one DequantizeLinear (the output)."""
    pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(Residual, config)
    assert [m.passthrough for m in q.modules() if isinstance(m, QAdd)] == [(True, False),
                                                                           (False, True)]
    model, _ = to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    xs = on_grid(q, x[16:])
    assert torch.equal(torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0]),
                       IntegerModel(q).run(xs))


def test_an_add_onto_an_odd_zero_point_runs_exactly_in_onnxruntime(tmp_path, monkeypatch):
    """onnxruntime's QLinearAdd adds the output zero-point before rounding half to even, so on
    power-of-two grids (exact ties everywhere) with an odd zero-point it is a code off the
    ONNX definition; the exporter writes such an add as Sum, which stays unfused and exact.
    Without that rule the same model is off (so the rule is still needed)."""
    pytest.importorskip("onnx")
    from lowbit.export import onnx_qdq

    q, x = quantized(Padded, "w8a8")
    for m in q.modules():
        if isinstance(m, UniformQuantizer) and m.scale.numel() == 1:
            m.scale.copy_(2.0 ** torch.round(torch.log2(m.scale)))
    torch.manual_seed(1)
    xs = on_grid(q, 2 * torch.randn(64, 3, 16, 16))
    ref = IntegerModel(q).run(xs)
    model, report = onnx_qdq.to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    assert report.extra["unfused_adds"] == ["qadd0"] and "unfused" in report.summary()
    assert "Sum" in ops and "QLinearAdd" not in ops
    assert torch.equal(torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0]), ref)
    monkeypatch.setattr(onnx_qdq._Writer, "fused_add_ties", False)
    model, _ = onnx_qdq.to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    assert "QLinearAdd" in ops
    assert not torch.equal(torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0]), ref)


def test_int8_weights_option_writes_8_bit_weights_as_int8():
    onnx = pytest.importorskip("onnx")
    from lowbit.export.onnx_qdq import to_onnx

    q, x = quantized(Plain, "w8a8")
    types = {}
    for int8 in (False, True):
        model, _ = to_onnx(q, x[:2], int8_weights=int8)
        types[int8] = {i.data_type for i in model.graph.initializer if i.name.startswith("c3_w_")
                       and i.name.split("_")[2].isdigit()}
    assert types == {False: {onnx.TensorProto.UINT8}, True: {onnx.TensorProto.INT8}}
