"""``lowbit.export``: one call from a calibrated model to a file an integer runtime runs.

Every check that can fail is made before any work (format, output path, optional packages,
calibration), and files appear only complete: written under a temporary name and renamed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError, OutputError
from ..nn.layers import QuantLayerMixin
from ..outputs import check_file, check_folder
from ..prepare import quantizers
from ..utils import atomic_write, atomic_write_text
from .integer import IntegerModel, dyadic
from .onnx_qdq import ExportReport

FORMATS = ("onnx", "qonnx", "int", "packed")
FILE_FORMATS = ("onnx", "qonnx")
EXTRA = "pip install lowbit[export]"


def _need(module: str, why: str, extra: str = EXTRA) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{why} needs the {module} package, which is not installed: {extra}")


def check_output(path: str | Path, directory: bool, flag: str = "path") -> Path:
    """Refuse an output that cannot be written, before any work (:mod:`lowbit.outputs`); a
    folder output must also be new or empty, so no earlier export is mixed into it."""
    if not directory:
        return check_file(path, flag)
    p = check_folder(path, flag)
    if p.is_dir() and any(p.iterdir()):
        raise OutputError(f"{flag} {path} is not empty; remove it or give a new folder name")
    return p


def need_packages(format: str, check: bool) -> None:
    """The optional packages a format needs (named with the extra that installs them)."""
    if format in FILE_FORMATS:
        _need("onnx", f"{format.upper()} export")
    if format == "onnx" and check:
        _need("onnxruntime", "checking the ONNX export against the integer reference")
    if format == "qonnx" and check:
        _need("qonnx", "checking the QONNX export", "pip install lowbit[qonnx] (or check=False)")


def check_calibrated(qmodel: nn.Module) -> None:
    if not any(isinstance(m, QuantLayerMixin) for m in qmodel.modules()):
        raise ConfigError("the model has no quantized layers: prepare it with lowbit.prepare "
                          "and calibrate it (or run lowbit ptq) before exporting")
    missing = [q.name or type(q).__name__ for q in quantizers(qmodel) if not q.calibrated]
    if missing:
        raise CalibrationError(
            f"the model is not calibrated ({len(missing)} quantizers never saw data, first: "
            f"{missing[0]!r}), so it has no integer form; run lowbit.calibrate(model, data) or "
            "lowbit ptq first")


def _int_tensors(im: IntegerModel) -> tuple[dict[str, torch.Tensor], dict]:
    """Unpacked integer model: int8 weight codes, int32 biases and, per requantization, the
    dyadic multiplier ``m`` and shift ``n`` per output channel."""
    from .integer import Grid
    from .packed import packed_tensors

    tensors, manifest = packed_tensors(im)
    for name, lf in im.layers.items():
        tensors[f"{name}.weight"] = lf.weight_form.codes.to(torch.int8)
        manifest["layers"][name]["weight"]["container"] = 8
        target = im.targets.get(next(op.node for op in im.ops if op.name == name))
        if target is not None:
            m, n = dyadic(lf.acc_scale / Grid.of(target).scale)
            tensors[f"{name}.multiplier"] = m.to(torch.int32)
            tensors[f"{name}.shift"] = n.to(torch.int32)
    manifest["format"] = "lowbit-int/1"
    return tensors, manifest


def _write_folder(path: Path, fill) -> None:
    """Fill a temporary folder beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        fill(tmp)
        _readable(tmp, 0o777)
        for f in tmp.iterdir():
            _readable(f, 0o666)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ort_check(model, im: IntegerModel, example: torch.Tensor) -> dict:
    """Run the ONNX model with onnxruntime on the example against the integer reference."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": example.numpy()})[0])
    return {"runtime_vs_integer_max_abs": float((got - im.run(example)).abs().max())}


def run_qonnx(model, x: torch.Tensor) -> torch.Tensor:
    """Execute a QONNX model with the qonnx package's executor (static shapes: the batch of
    ``x``)."""
    import copy

    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    model = copy.deepcopy(model)
    for v in (model.graph.input[0], model.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = len(x)
    mw = ModelWrapper(model).transform(InferShapes())
    return torch.from_numpy(execute_onnx(mw, {"input": x.numpy()})["output"])


def _qonnx_check(model, im: IntegerModel, example: torch.Tensor) -> dict:
    got = run_qonnx(model, example)
    return {"runtime_vs_integer_max_abs": float((got - im.run(example)).abs().max())}


def export(qmodel: nn.Module, example: torch.Tensor, format: str = "onnx",
           path: str | Path | None = None, *, check: bool = True,
           int8_weights: bool = False) -> ExportReport:
    """Export a calibrated lowbit model.

    ``format``: ``onnx`` (QCDQ for onnxruntime, a file), ``qonnx`` (a file: ``Quant`` nodes
    with the true bit-widths, for FINN/hls4ml), ``int`` (a folder: int8 weight codes,
    int32 biases, dyadic requantization multipliers and shifts, ``manifest.json``) or
    ``packed`` (a folder: 1/2/4/8-bit codes packed into bytes and ``manifest.json``).
    ``example`` is one input batch (its shape fixes all but the batch dimension). ``check``
    runs the file (onnxruntime, or qonnx's executor) on the example against the integer
    reference. ``int8_weights`` (onnx): 8-bit weights as int8, for onnxruntime's U8S8
    kernels (:func:`lowbit.export.onnx_qdq.to_onnx`). Returns the export report: what runs
    on integers, what stayed float and why.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if path is None:
        raise ConfigError("give the output path")
    out = check_output(path, directory=format not in FILE_FORMATS)
    need_packages(format, check)
    check_calibrated(qmodel)
    example = example.detach().cpu()
    was_training = qmodel.training
    qmodel.eval()
    try:
        return _export(qmodel.cpu(), example, format, out, check, int8_weights)
    finally:
        qmodel.train(was_training)


def _export(qmodel, example, format, out: Path, check: bool,
            int8_weights: bool = False) -> ExportReport:
    im = IntegerModel(qmodel)
    if format in FILE_FORMATS:
        from .onnx_qdq import to_onnx, to_qonnx

        model, report = to_onnx(qmodel, example, im, int8_weights=int8_weights) \
            if format == "onnx" else to_qonnx(qmodel, example, im)
        data = model.SerializeToString()
        if check:
            run = _ort_check if format == "onnx" else _qonnx_check
            report.extra.update(run(model, im, example))
        atomic_write(out, lambda p: (Path(p).write_bytes(data), _readable(Path(p), 0o666)))
    else:
        from safetensors.torch import save_file

        from .packed import packed_tensors

        im.run(example)
        tensors, manifest = packed_tensors(im) if format == "packed" else _int_tensors(im)
        report = ExportReport(integer=list(im.layers))
        report.bits = {n: (lf.module.w_bits, lf.module.a_bits) for n, lf in im.layers.items()}
        report.dequantized = {n: f"kept float ({k})" for n, k in im.stats.float_ops.items()}
        for lf in im.layers.values():
            report.note_rescaled(lf)

        def fill(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(tmp / "weights.safetensors"))
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))

        _write_folder(out, fill)
    report.shifts_only = im.power_of_two or None
    report.extra.update(format=format, path=str(out), bytes=_size(out))
    return report


def _readable(path: Path, mode: int) -> None:
    """Temporary files are private (0600); the result gets the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
