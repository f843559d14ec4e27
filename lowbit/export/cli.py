"""``lowbit export``: a folder written by ``lowbit ptq/qat --save`` to an integer model file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .api import FILE_FORMATS, FORMATS, check_output, need_packages

SAVED = ("config.yaml", "model.safetensors")


def _saved_folder(directory: str) -> tuple[Path, dict]:
    path = Path(directory).expanduser()
    missing = [f for f in SAVED if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise ModelError(f"{path} is not a folder written by 'lowbit ptq --save' (missing "
                         f"{', '.join(missing) if path.is_dir() else 'the folder'}); pass the "
                         "folder given to --save")
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return path, meta


def run(args) -> int:
    from ..errors import ConfigError

    if args.format not in FORMATS:
        raise ConfigError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    folder, meta = _saved_folder(args.quantized)
    out = check_output(args.output, args.format not in FILE_FORMATS, "--output/-o")
    need_packages(args.format, not args.no_check)
    name = args.model or meta.get("model")
    if not name:
        raise ModelError(f"{folder}/meta.json does not name the model; give --model")
    weights = args.weights if args.weights is not None else meta.get("weights")
    from ..models import get_model, get_spec
    from ..pipeline import example_input, load_quantized
    from .api import export

    spec = get_spec(name)
    example = example_input(spec, batch=2)
    qmodel = load_quantized(get_model(name, weights), folder, example)
    if args.points:
        qmodel = _with_points(qmodel, spec, args)
    if args.int8_weights and args.format != "onnx":
        raise ConfigError("--int8-weights applies to --format onnx only")
    report = export(qmodel, example, args.format, out, check=not args.no_check,
                    int8_weights=args.int8_weights)
    print(report.summary())
    diff = report.extra.get("runtime_vs_integer_max_abs")
    if diff is not None:
        runtime = "onnxruntime" if args.format == "onnx" else "qonnx"
        print(f"{runtime} against the integer reference on the example: max |diff| {diff:.3g}")
    print(f"wrote {out} ({report.extra['bytes']} bytes)")
    return 0


def _with_points(qmodel, spec, args):
    """Insert the integer model's quantization points and calibrate just them."""
    from ..nn.points import calibrate_points, insert_points
    from ..pipeline import build_data

    data = build_data(spec, args.dataset, args.data_root, calib_size=args.calib_size,
                      eval_size=1, batch_size=64)
    qmodel, points = insert_points(qmodel)
    calibrate_points(qmodel, points, data.calib)
    print(f"quantization points: {len(points.adds)} QAdd, {len(points.outputs)} output grids, "
          f"{len(points.biases)} int32 biases, calibrated on {len(data.calib.dataset)} images")
    return qmodel
