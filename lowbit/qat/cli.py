"""``lowbit qat``: quantization-aware training from flags or a recipe file.

Every flag defaults to "not given" so that, with ``--recipe``, only the flags on the command
line override the recipe; without a recipe the library defaults apply.
"""

from __future__ import annotations

import argparse

from ..cli_args import bits_arg as _bits
from ..cli_args import random_init_arg
from ..errors import ConfigError

EBR_DEFAULT = 1e-2  # EntropyBinRegularizer's default weight; a literal keeps --help torch-free


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "qat", help="quantization-aware training (QIL, LSQ), progressive schedules, resume",
        description="Quantization-aware training from a pretrained model. Multi-GPU: "
        "torchrun --nproc_per_node N -m lowbit.cli qat ...",
    )
    S = argparse.SUPPRESS
    g = p.add_argument_group("run")
    g.add_argument("--recipe", default=None, help="a recipe YAML (see recipes/); flags override it")
    g.add_argument("--method", choices=["qil", "lsq"], default=S, help="QAT method (default qil)")
    g.add_argument("--model", "-m", default=S, help="model name (see 'lowbit info --list')")
    g.add_argument("--weights", "-w", default=S, help="pretrained weights file")
    random_init_arg(g)
    g.add_argument("--output-dir", "-o", default=None,
                   help="checkpoint.pt, history.csv, steps.csv, results.json, model/ go here "
                   "(default: a new lowbit-runs/qat-MODEL-TIME); it must be new or empty "
                   "unless --resume or --overwrite")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT_DIR from its checkpoint.pt (refused if the "
                   "run differs; a larger --epochs extends it)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUTPUT_DIR (removes its checkpoint, logs, results)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--no-eval-float", action="store_true", help="skip evaluating the float model")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", "-d", default=S, help="dataset (default: the model's)")
    d.add_argument("--data-root", default=None, help="dataset folder (default ~/.cache/lowbit-data)")
    d.add_argument("--train-root", default=None, metavar="DIR",
                   help="train on the images in DIR (any folder, nested or flat, no labels "
                   "needed: use --loss kd) instead of the dataset's training split")
    d.add_argument("--train-dataset", default=S, metavar="NAME",
                   help="dataset name of --train-root (default 'images': unlabeled images; a "
                   "registry name such as cifar10 reads that layout, with labels)")
    d.add_argument("--calib-root", default=None, metavar="DIR",
                   help="calibrate the quantizers on images from DIR (default: the training "
                   "images; see docs/calibration.md)")
    d.add_argument("--calib-dataset", default=S, metavar="NAME",
                   help="dataset name of --calib-root (default: the evaluation dataset's; "
                   "'images' for any folder of images)")
    d.add_argument("--batch-size", type=int, default=S, help="training batch per process (128)")
    d.add_argument("--calib-size", type=int, default=S, help="images that initialise quantizers")
    d.add_argument("--eval-size", type=int, default=S, help="evaluate on a seeded subset of N")
    d.add_argument("--workers", type=int, default=S, help="data-loading worker processes")

    q = p.add_argument_group("quantization")
    q.add_argument("--w-bits", type=_bits, default=None, help="weight bits (one stage; default 4)")
    q.add_argument("--a-bits", type=_bits, default=None, help="activation bits (default 4)")
    q.add_argument("--progressive", default=None, metavar="W/A,...",
                   help="progressive stages, e.g. 5/5,4/4,3/3,2/2 (each starts from the previous)")
    q.add_argument("--per-tensor", action="store_true", default=S,
                   help="one interval/step per tensor (the QIL paper); default per channel")
    q.add_argument("--first-last", choices=["8bit", "float", "same"], default=S,
                   help="first and last layer policy (default 8bit)")
    q.add_argument("--observer", choices=["minmax", "percentile", "mse"], default=S,
                   help="range observer that initialises the quantizers (default mse)")
    q.add_argument("--no-learn-gamma", action="store_true", default=S,
                   help="QIL: keep the weight nonlinearity gamma fixed at 1")
    q.add_argument("--quant-config", "--config", default=S, metavar="FILE",
                   help="a QuantConfig file, e.g. the per-layer mixed-precision config.yaml "
                   "that 'lowbit search' writes (single stage; --method defaults to its "
                   "quantizer kind)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=S, help="epochs per stage (default 1)")
    t.add_argument("--max-steps", type=int, default=S, dest="max_steps_per_epoch",
                   help="cut each epoch after N steps")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default=S, help="default sgd")
    t.add_argument("--lr", type=float, default=S, help="weights' learning rate (default 5e-4)")
    t.add_argument("--quant-lr", type=float, default=S, help="quantizer parameters' lr (default 5e-3)")
    t.add_argument("--weight-decay", type=float, default=S, help="conv/linear weights (1e-4)")
    t.add_argument("--quant-weight-decay", type=float, default=S, help="quantizers (default 0)")
    t.add_argument("--momentum", type=float, default=S, help="SGD momentum (default 0.9)")
    t.add_argument("--schedule", choices=["cosine", "step", "constant"], default=S,
                   help="learning-rate schedule (default cosine)")
    t.add_argument("--warmup-steps", type=int, default=S, help="linear warm-up steps (0)")
    t.add_argument("--bn", choices=["fold", "train", "freeze"], default=S,
                   help="BatchNorm: fold into weights (default), train, or freeze")
    t.add_argument("--quantizer-only", action="store_true", default=S, dest="freeze_weights",
                   help="freeze the weights, train only the quantizer parameters")
    t.add_argument("--stage-init", choices=["keep", "calibrate"], default=S,
                   help="progressive stages: keep the learned quantizer parameters (default) or "
                   "re-initialise them with the range observer at the new bits")
    t.add_argument("--no-channels-last", action="store_false", default=S, dest="channels_last",
                   help="keep NCHW memory layout")
    t.add_argument("--augment", choices=["none", "flip", "crop-flip"], default=S,
                   help="batch augmentation (default none; CIFAR recipes use crop-flip)")
    t.add_argument("--grad-clip", type=float, default=S, help="clip the global gradient norm")
    t.add_argument("--loss", default=S, metavar="NAME",
                   help="task loss: classifiers ce (cross-entropy on the labels; default) or kd "
                   "(distil from the float model only: no labels are read, any images train); "
                   "super-resolution models l1 (default) or l2 against the HR image")
    t.add_argument("--patch", type=int, default=S,
                   help="super-resolution: HR training patch side (default input_size x scale)")
    t.add_argument("--label-smoothing", type=float, default=S, help="default 0")
    t.add_argument("--distill", type=float, default=S, dest="kd_weight", metavar="WEIGHT",
                   help="deprecated alias of --kd-weight")

    r = p.add_argument_group("regularization and distillation (SDQ retraining)")
    r.add_argument("--ebr", type=float, nargs="?", const=EBR_DEFAULT, default=S, metavar="WEIGHT",
                   help="entropy-aware bin regularization; WEIGHT defaults to "
                   f"{EBR_DEFAULT:g} (the SDQ recipe's value)")
    r.add_argument("--ebr-entropy", type=float, default=S, dest="ebr_entropy_weight",
                   metavar="W", help="EBR weight of the bin-evenness (entropy) term (0.1)")
    r.add_argument("--kd-teacher", "--teacher", default=S, metavar="MODEL",
                   help="distil from this registry model ('same': the float model itself)")
    r.add_argument("--kd-teacher-weights", default=S, metavar="FILE",
                   help="weights of --kd-teacher MODEL")
    r.add_argument("--kd-weight", type=float, default=S, metavar="W",
                   help="distillation weight (1 with --kd-teacher); without --kd-teacher it "
                   "distils from the float model being quantized")
    r.add_argument("--kd-temperature", type=float, default=S, metavar="T",
                   help="distillation softening temperature (1; 4 can break 3-bit training)")
    t.add_argument("--logger", choices=["csv", "tensorboard", "none"], default=S,
                   help="step logs: csv (default) or tensorboard")
    t.add_argument("--log-every", type=int, default=S, help="steps between log lines (50)")
    t.add_argument("--seed", type=int, default=S, help="seed of data order and init (0)")
    return p


TRAIN_FLAGS = ["epochs", "max_steps_per_epoch", "optimizer", "lr", "quant_lr", "weight_decay",
               "quant_weight_decay", "momentum", "schedule", "warmup_steps", "bn",
               "freeze_weights", "stage_init", "channels_last", "augment", "grad_clip",
               "loss", "label_smoothing", "logger", "log_every", "seed"]
RECIPE_FLAGS = ["method", "model", "weights", "dataset", "batch_size", "calib_size", "eval_size",
                "workers", "observer", "quant_config", "kd_teacher", "kd_teacher_weights",
                "kd_weight", "kd_temperature", "ebr", "ebr_entropy_weight", "train_dataset",
                "calib_dataset", "patch"]


def _config_method(path: str) -> str | None:
    """The QAT method a QuantConfig file implies (its weight quantizer kind), so that
    ``--config found.yaml`` from ``lowbit search`` (LSQ) needs no ``--method``."""
    from ..config import QuantConfig

    spec = QuantConfig.load(path).weight
    return spec.kind if spec is not None and spec.kind in ("qil", "lsq") else None


def _config_stage(path: str, stages: list[dict] | None) -> dict:
    """The one stage of a run on a QuantConfig file, labelled with the file's default bits (its
    per-layer rules may differ); a recipe's own single stage keeps its training overrides."""
    from ..config import QuantConfig
    from .schedule import Stage

    if stages and len(stages) > 1:
        raise ConfigError("quant_config applies to a single stage; drop the extra stages")
    cfg = QuantConfig.load(path)
    bits = cfg.weight.bits if cfg.weight is not None else None
    if bits is None:
        raise ConfigError(f"{path}: a QAT config needs a default 'weight' spec")
    extra = {k: v for k, v in (stages[0] if stages else {}).items()
             if k not in ("w_bits", "a_bits")}
    return Stage(w_bits=bits, a_bits=cfg.act.bits if cfg.act is not None else None,
                 **extra).model_dump()


def build_recipe(args):
    """The recipe file (if any) with the command-line flags applied on top."""
    from ..config import validate_model
    from .recipes import Recipe, load_recipe
    from .schedule import Stage, parse_stages

    data = load_recipe(args.recipe).model_dump() if args.recipe else {}
    if not args.recipe and not hasattr(args, "model"):
        raise ConfigError("give --model NAME (and --method), or a --recipe file")
    for key in RECIPE_FLAGS:
        if hasattr(args, key):
            data[key] = getattr(args, key)
    if not data.get("method") and data.get("quant_config"):
        method = _config_method(data["quant_config"])
        if method is not None:
            data["method"] = method
    if hasattr(args, "per_tensor"):
        data["per_channel"] = False
    if hasattr(args, "no_learn_gamma"):
        data["learn_gamma"] = False
    if hasattr(args, "first_last"):
        data["first_last"] = args.first_last
    train = dict(data.get("train") or {})
    for key in TRAIN_FLAGS:
        if hasattr(args, key):
            train[key] = getattr(args, key)
    if args.no_progress:
        train["progress"] = False
    data["train"] = train
    bit_flags = [f for f, v in (("--progressive", args.progressive), ("--w-bits", args.w_bits),
                                ("--a-bits", args.a_bits)) if v is not None]
    if data.get("quant_config"):
        # The config file sets every layer's bits; a stage's bits would only mislabel the run.
        if bit_flags:
            raise ConfigError(f"--config sets the bits; drop {', '.join(bit_flags)} (or drop "
                              "--config and give the bits as flags)")
        data["stages"] = [_config_stage(data["quant_config"], data.get("stages"))]
    elif args.progressive:
        if args.w_bits is not None or args.a_bits is not None:
            raise ConfigError("give either --progressive or --w-bits/--a-bits, not both")
        data["stages"] = [s.model_dump() for s in parse_stages(args.progressive)]
    elif args.w_bits is not None or args.a_bits is not None or not data.get("stages"):
        w = args.w_bits if args.w_bits is not None else 4
        a = args.a_bits if args.a_bits is not None else w
        data["stages"] = [Stage(w_bits=w, a_bits=a).model_dump()]
    return validate_model(Recipe, data, "qat settings")


def run_folder(args, command: str, model: str, checkpoints=("checkpoint.pt",)):
    """The checked output folder of a ``qat``/``search`` run (see lowbit.outputs)."""
    import os

    from ..outputs import claim_run_dir, default_run_dir

    if args.output_dir is None:
        if args.resume:
            raise ConfigError("--resume needs -o/--output-dir: the folder of the run to continue")
        args.output_dir = str(default_run_dir(command, model))
    return claim_run_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                         checkpoints=checkpoints, main_process=os.environ.get("RANK", "0") == "0")


def run(args) -> int:
    from ..models import check_weights_given, get_spec
    from ..tasks import get_task
    from .recipes import resolve_loss, run_recipe, train_source

    recipe = resolve_loss(build_recipe(args))
    check_weights_given(recipe.model, recipe.weights, args.random_init)
    train_source(recipe, args.data_root, args.train_root)
    out_dir = run_folder(args, "qat", recipe.model)
    print(f"run folder: {out_dir}")
    out = run_recipe(recipe, data_root=args.data_root, train_root=args.train_root,
                     calib_root=args.calib_root, output_dir=out_dir,
                     resume=args.resume, eval_float=not args.no_eval_float)
    task = get_task(get_spec(recipe.model).task)
    if all(out.get(k) is not None for k in task.score_keys):
        base = {k: out.get(f"float_{k}") for k in task.score_keys}
        float_text = task.headline(base) if None not in base.values() else "not evaluated"
        print(f"{recipe.method} {recipe.model}: {task.headline(out)} "
              f"(float {float_text}); results in {out_dir}")
    return 0
