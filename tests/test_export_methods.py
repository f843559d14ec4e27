"""Every method's output exports: range calibration, power-of-two PTQ, block reconstruction,
QAT (LSQ, QIL), a mixed-precision config as SDQ writes one, and a model kept partly float.

Each exported ONNX graph, run by onnxruntime on inputs already on the input grid, must equal
the integer reference, and the packed weights must hold each layer's own bit-width.
"""

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit.export.integer import IntegerModel
from lowbit.export.packed import read_packed
from lowbit.nn.points import calibrate_points, insert_points
from lowbit.qat import TrainConfig, qat
from tests.test_export import Residual, _ort, on_grid, randomize_bn


def _data():
    torch.manual_seed(0)
    x = torch.randn(48, 3, 16, 16)
    y = torch.randint(0, 4, (48,))
    return x, y


def _ptq(method, config, **opts):
    x, _ = _data()
    model = randomize_bn(Residual())
    return lowbit.ptq(model, method, [x[:16], x[16:32]], config, x[:2], progress=False, **opts)


def _qat(method):
    x, y = _data()
    res = qat(randomize_bn(Residual()), method, DataLoader(TensorDataset(x, y), batch_size=16),
              calib_data=[x[:32]], example_inputs=x[:2], w_bits=3, a_bits=4,
              config_options={"first_last": "same"},
              train=TrainConfig(epochs=1, lr=0.01, progress=False, channels_last=False))
    return res.model


MIXED = lowbit.QuantConfig.uniform(4, 4, layers=[
    {"match": "a1", "w_bits": 2}, {"match": "a2", "w_bits": 3}, {"match": "b1", "w_bits": 5},
    {"match": "b2", "a_bits": 6}])
PARTLY_FLOAT = lowbit.QuantConfig.uniform(4, 8, layers=[{"match": "a2", "keep_float": True}])

RUNS = {
    "minmax": lambda: _ptq("minmax", lowbit.QuantConfig.uniform(8, 8)),
    "percentile": lambda: _ptq("percentile", lowbit.QuantConfig.uniform(4, 8)),
    "mse": lambda: _ptq("mse", lowbit.QuantConfig.uniform(4, 4, observer="mse")),
    "pot": lambda: _ptq("pot", lowbit.QuantConfig.uniform(4, 8, kind="pot")),
    "rapq": lambda: _ptq("rapq", lowbit.QuantConfig.uniform(4, 4, kind="pot"), iters=4),
    "brecq": lambda: _ptq("brecq", lowbit.QuantConfig.uniform(2, 4), iters=4),
    "lsq": lambda: _qat("lsq"),
    "qil": lambda: _qat("qil"),
    "sdq-mixed": lambda: _ptq("mse", MIXED),
    "partly-float": lambda: _ptq("mse", PARTLY_FLOAT),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_methods_output_runs_on_onnxruntime_as_the_integer_reference(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.export.onnx_qdq import to_onnx

    q = RUNS[run]()
    q, points = insert_points(q)
    x, _ = _data()
    calibrate_points(q, points, [x[:32]])
    model, report = to_onnx(q, x[:2])
    sess, ops = _ort(model, tmp_path)
    xs = on_grid(q, x[32:])
    got = torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0])
    ref = IntegerModel(q).run(xs)
    if run == "partly-float":
        # the float layer runs as a float conv between dequantized values, and says so; two
        # runtimes sum a float conv in different orders, so a near-tie downstream may land one
        # output code apart, never more
        assert "a2" in report.dequantized, report
        step = torch.diff(torch.unique(ref)).min()
        assert (got - ref).abs().max() <= step * 1.001
        assert (got == ref).double().mean() > 0.8
        made_by = {out: n.op_type for n in model.graph.node for out in n.output}
        float_weights = [n for n in model.graph.node
                         if n.op_type == "Conv" and made_by.get(n.input[1]) != "DequantizeLinear"]
        assert len(float_weights) == 1 and len(report.integer) == 5
    else:
        assert torch.equal(got, ref)
        assert ops.count("QLinearConv") == 5 and "Conv" not in ops, ops

    lowbit.export(q, x[:2], "packed", tmp_path / "packed")
    codes = read_packed(tmp_path / "packed")
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    bits = {name: entry["weight"]["bits"] for name, entry in manifest["layers"].items()}
    layers = dict(q.named_modules())
    for name, b in bits.items():
        w = layers[name].weight_quant
        assert b == w.bits
        key = manifest["layers"][name]["weight"]["key"]
        assert torch.equal(codes[key], w.integer_form(layers[name].weight).codes.to(torch.int32))
    if run == "sdq-mixed":
        assert (bits["a1"], bits["a2"], bits["b1"]) == (2, 3, 5)
    if run == "partly-float":
        assert "a2" not in bits
