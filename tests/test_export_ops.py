"""Concat, pixel shuffle and nearest upsampling: integer reference, bit-exact simulation,
onnxruntime and QONNX agree; EDSR exports."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export import agreement, bit_exact
from lowbit.export.integer import IntegerModel
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
    QLinearConv; outputs within one code of the integer reference (the float mean shift
    before the first quantizer rounds differently in onnxruntime now and then)."""
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
