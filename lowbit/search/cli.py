"""``lowbit search``: mixed-precision search from the command line (thin: parse, call the API).

One ``--budget`` runs one search and writes its config, table and plot; several run a Pareto
sweep that retrains each found config briefly with the shared QAT trainer (optionally with EBR
and distillation) and writes ``pareto.csv`` / ``pareto.png``. ``--method dqss`` searches each
layer's quantization strategy at given bits instead (no budget; ``--mode ptq|qat``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import act_bits_arg as _act_bits
from ..cli_args import bits_arg as _bits
from ..cli_args import random_init_arg
from ..errors import LowbitError


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..losses.distill import KD_TEMPERATURE

    p = subparsers.add_parser(
        "search", help="mixed-precision search (SDQ) toward a budget; several budgets: Pareto sweep",
        description="Learn per-layer weight bits with SDQ and write a lowbit config "
        "(retrain it with 'lowbit qat --config DIR/config.yaml --ebr --kd-weight 1').",
    )
    g = p.add_argument_group("run")
    g.add_argument("--recipe", default=None,
                   help="an SDQ recipe YAML: search, then retrain with EBR + KD (other search "
                   "options come from the recipe; --data-root, -o and --no-plot still apply)")
    g.add_argument("--method", default="sdq",
                   help="a registered search method (default sdq; lowbit.search.search_names())")
    g.add_argument("--model", "-m", default=None, help="model name (see 'lowbit info --list')")
    g.add_argument("--weights", "-w", default=None, help="pretrained float weights")
    random_init_arg(g)
    g.add_argument("--budget", "-b", action="append", metavar="[KIND:]VALUE",
                   help="avg_weight_bits:2.5 (or just 2.5), bitops:1.2G, weight_memory:64KiB; "
                   "repeat for a Pareto sweep")
    g.add_argument("--output-dir", "-o", default=None,
                   help="where results go (default: a new lowbit-runs/search-MODEL-TIME); it "
                   "must be new or empty unless --resume or --overwrite")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (or sweep) from its checkpoint in -o")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the search in -o (removes its checkpoints and results)")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", "-d", default=None, help="dataset (default: the model's)")
    d.add_argument("--data-root", default=None, help="dataset folder (default ~/.cache/lowbit-data)")
    d.add_argument("--train-size", type=int, default=None,
                   help="search on a seeded subset of N training images (default: all)")
    d.add_argument("--eval-size", type=int, default=None, help="sweep: evaluate on a subset of N")
    d.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    d.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    d.add_argument("--seed", type=int, default=0, help="seed of data order and sampling (0)")

    s = p.add_argument_group("search")
    s.add_argument("--min-bits", type=_bits, default=2,
                   help="lowest weight bits (default 2; 1 allows binary {-s,+s} weights)")
    s.add_argument("--max-bits", type=_bits, default=8, help="starting weight bits (default 8)")
    s.add_argument("--a-bits", type=_act_bits, default=4,
                   help="activation bits, or 'float' (default 4)")
    s.add_argument("--first-last", choices=["8bit", "float", "same"], default="8bit",
                   help="first/last layer: fixed at 8 bits, float, or searched (same)")
    s.add_argument("--per-tensor", action="store_true", help="one weight step per tensor")
    s.add_argument("--observer", choices=["minmax", "percentile", "mse"], default="mse",
                   help="range observer initialising the LSQ steps (default mse)")
    s.add_argument("--steps", type=int, default=2000, help="maximum search steps (2000)")
    s.add_argument("--check-every", type=int, default=20, help="steps between step-downs (20)")
    s.add_argument("--threshold", type=float, default=0.9, help="DBP that steps a layer down")
    s.add_argument("--lr", type=float, default=1e-4, help="weights' Adam lr (1e-4)")
    s.add_argument("--quant-lr", type=float, default=1e-3, help="LSQ steps' Adam lr (1e-3)")
    s.add_argument("--dbp-lr", type=float, default=0.02, help="DBPs' Adam lr (0.02)")
    s.add_argument("--cost-weight", type=float, default=1.0, help="initial cost weight (1)")
    s.add_argument("--cost-growth", type=float, default=1.05,
                   help="cost weight multiplier at each check still over budget (1.05)")
    s.add_argument("--calib-batches", type=int, default=8, help="batches initialising LSQ (8)")
    s.add_argument("--loss", default=None, metavar="NAME",
                   help="task loss of the search steps (default: the model's task's, ce for "
                   "classifiers, l1 for super-resolution; l2 also)")

    q = p.add_argument_group("dqss (--method dqss; also uses --a-bits, --first-last, --per-tensor, "
                             "--observer, --steps, --lr, --quant-lr, --calib-batches, "
                             "--check-every)")
    q.add_argument("--mode", choices=["ptq", "qat"], default="ptq",
                   help="search on calibration data (ptq, default) or while training (qat)")
    q.add_argument("--w-bits", type=_bits, default=4, help="weight bits (default 4)")
    q.add_argument("--candidates", default=None, metavar="LIST",
                   help="comma-separated strategies for weights and activations alike, e.g. "
                   "mse,lsq,pact (names: minmax, percentile, mse, a quantizer kind, KIND:OBSERVER)")
    q.add_argument("--w-candidates", default=None, metavar="LIST",
                   help="weight strategies (default minmax,mse,lsq,qil; qat: pact for qil)")
    q.add_argument("--a-candidates", default=None, metavar="LIST",
                   help="activation strategies (default percentile,mse,lsq,pact)")
    q.add_argument("--base-config", default=None, metavar="FILE",
                   help="search on this config, keeping its per-layer bits (e.g. an SDQ result)")
    q.add_argument("--iters", type=int, default=200, help="ptq: search steps per unit (200)")
    q.add_argument("--finetune-iters", type=int, default=100,
                   help="ptq: steps per unit for the chosen quantizers after the choice (100)")
    q.add_argument("--compare-iters", type=int, default=25,
                   help="ptq: fine-tune steps of each option before they are compared; the "
                   "winner then goes on to --finetune-iters (25; 0: compare at the end)")
    q.add_argument("--choose-by", choices=["argmax", "finetuned"], default="finetuned",
                   help="ptq: each unit's choice: the argmax, or the lowest error after the "
                   "fine-tune among the argmax and each strategy throughout the unit (finetuned)")
    q.add_argument("--finetune-steps", type=int, default=0,
                   help="qat: training steps of the discrete model after the argmax (0)")
    q.add_argument("--arch-lr", type=float, default=0.05, help="alpha/beta Adam lr (0.05)")
    q.add_argument("--temperature", type=float, default=1.0, help="start temperature (1)")
    q.add_argument("--final-temperature", type=float, default=0.1,
                   help="end temperature (0.1; equal to --temperature: no annealing)")
    q.add_argument("--warmup", type=float, default=0.2,
                   help="fraction of the steps before alpha/beta move (0.2; 0: none)")

    r = p.add_argument_group("sweep retraining (several budgets; the shared QAT trainer, LSQ)")
    r.add_argument("--retrain-epochs", type=int, default=1, help="epochs per found config (1)")
    r.add_argument("--retrain-steps", type=int, default=None, help="cut each epoch at N steps")
    r.add_argument("--retrain-optimizer", choices=["adam", "sgd"], default="adam",
                   help="optimizer of the retraining (default adam)")
    r.add_argument("--retrain-lr", type=float, default=1e-4,
                   help="lr of weights and LSQ steps (1e-4)")
    r.add_argument("--retrain-grad-clip", type=float, default=None,
                   help="clip the global gradient norm (default off)")
    r.add_argument("--ebr", type=float, nargs="?", const=1e-2, default=0.0, metavar="WEIGHT",
                   help="entropy-aware bin regularization (WEIGHT 0.01 if omitted; default off)")
    r.add_argument("--ebr-entropy", type=float, default=0.1, help="EBR entropy-term weight (0.1)")
    r.add_argument("--kd-teacher", default=None, metavar="same|MODEL",
                   help="distil from the float model itself ('same') or another model")
    r.add_argument("--kd-teacher-weights", default=None, help="weights of --kd-teacher MODEL")
    r.add_argument("--kd-weight", type=float, default=None,
                   help="distillation weight (1); alone, distils from the float model")
    r.add_argument("--kd-temperature", type=float, default=KD_TEMPERATURE,
                   help=f"softening temperature ({KD_TEMPERATURE:g})")
    return p


def _task_loss(args) -> str:
    """``--loss``, checked against the model's task, or that task's default loss."""
    from ..models import get_spec
    from ..tasks import check_loss_task, get_task

    spec = get_spec(args.model)
    loss = args.loss or get_task(spec.task).losses[0]
    check_loss_task(spec, loss)
    return loss


def _settings(args):
    from ..config import validate_model
    from .sdq import SDQSettings

    return validate_model(SDQSettings, dict(
        loss=_task_loss(args),
        min_bits=args.min_bits, max_bits=args.max_bits, a_bits=args.a_bits,
        first_last=args.first_last, per_channel=not args.per_tensor, observer=args.observer,
        steps=args.steps,
        check_every=args.check_every, threshold=args.threshold, lr=args.lr,
        quant_lr=args.quant_lr, dbp_lr=args.dbp_lr, cost_weight=args.cost_weight,
        cost_growth=args.cost_growth,
        calib_batches=args.calib_batches, seed=args.seed,
    ), "search options")


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _dqss_settings(args):
    from ..config import validate_model
    from .dqss import DQSSSettings

    given = dict(
        mode=args.mode, w_bits=args.w_bits, a_bits=args.a_bits, observer=args.observer,
        per_channel=not args.per_tensor, first_last=args.first_last,
        base_config=args.base_config, temperature=args.temperature,
        final_temperature=args.final_temperature, warmup=args.warmup, arch_lr=args.arch_lr,
        quant_lr=args.quant_lr, iters=args.iters, finetune_iters=args.finetune_iters,
        compare_iters=args.compare_iters, choose_by=args.choose_by,
        steps=args.steps, lr=args.lr, loss=_task_loss(args) if args.mode == "qat" else None,
        calib_batches=args.calib_batches, check_every=args.check_every,
        finetune_steps=args.finetune_steps, seed=args.seed,
        w_candidates=_names(args.w_candidates) or _names(args.candidates),
        a_candidates=_names(args.a_candidates) or _names(args.candidates),
    )
    return validate_model(DQSSSettings, {k: v for k, v in given.items() if v is not None},
                     "dqss options")


def _run_dqss(args) -> int:
    """``--method dqss``: one search, its files, and the command that applies the config."""
    from ..errors import ConfigError
    from ..models import check_weights_given, get_model, get_spec
    from ..qat.cli import run_folder
    from ..tasks import get_task
    from .registry import run_search

    if args.budget:
        raise ConfigError("--method dqss takes no budget: it chooses each layer's quantizer at "
                          "--w-bits/--a-bits (use --base-config for per-layer bits)")
    if not args.model:
        raise LowbitError("give --model (and --mode ptq|qat)")
    settings = _dqss_settings(args)
    check_weights_given(args.model, args.weights, args.random_init)
    run_folder(args, "search", args.model)
    print(f"run folder: {args.output_dir}")
    spec = get_spec(args.model)
    model = get_model(args.model, args.weights)
    train = _train_loader(spec, args)
    example = next(iter(train))[0][:2]
    result = run_search("dqss", model, train, None, example, settings,
                        progress=not args.no_progress,
                        output_dir=args.output_dir if settings.mode == "qat" else None,
                        resume=args.resume, model_name=args.model)
    files = result.save(args.output_dir, plot=False if args.no_plot else None)
    print(result.table())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    if args.eval_size is not None:
        from ..evaluate import evaluate
        from ..pipeline import build_data

        data = build_data(spec, args.dataset, args.data_root, eval_size=args.eval_size,
                          batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                          calibration=False)
        res = evaluate(result.model, data.eval, progress=not args.no_progress, spec=spec)
        task = get_task(spec.task)
        print(f"searched model: {task.headline(task.scores(res))} on {data.protocol}")
    weights = f" -w {args.weights}" if args.weights else ""
    print(f"calibrate with it: lowbit ptq -m {args.model}{weights} --config {files['config']} "
          "--method mse (a calibration method keeps each layer's kind and observer)")
    if settings.mode == "qat":
        print("the searched model was trained with its choice (--finetune-steps trains it "
              "further); 'lowbit qat --config' takes one quantizer kind, see docs/dqss.md")
    return 0


def _train_loader(spec, args):
    from ..data import make_loader, subset
    from ..tasks import get_task

    task = get_task(spec.task)
    eval_name = (args.dataset or spec.default_dataset).lower()
    name = task.train_dataset(eval_name)  # --data-root is its folder (the only one given)
    train = task.train_set(spec, name, args.data_root)
    if args.train_size is not None and args.train_size < len(train):
        train = subset(train, args.train_size, args.seed)
    return make_loader(train, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed)


def _retrain_config(args):
    """The sweep's retraining flags as a QAT ``TrainConfig``: one lr for weights and LSQ steps
    and no weight decay (as the sweep always retrained), no step log (it keeps only the score)."""
    from ..config import validate_model
    from ..qat.trainer import TrainConfig

    return validate_model(TrainConfig, dict(
        epochs=args.retrain_epochs, max_steps_per_epoch=args.retrain_steps,
        optimizer=args.retrain_optimizer, lr=args.retrain_lr, quant_lr=None,
        weight_decay=0.0, grad_clip=args.retrain_grad_clip,
        seed=args.seed, progress=not args.no_progress, logger="none",
    ), "sweep retraining options")


def _loss_terms(args, model, example):
    """The sweep's EBR / KD terms, built as ``lowbit qat`` builds them."""
    from ..losses import build_loss_terms, load_teacher

    kd = args.kd_teacher is not None or args.kd_weight is not None
    teacher = load_teacher(args.kd_teacher, args.kd_teacher_weights, model) if kd else None
    return build_loss_terms(model, example, ebr=args.ebr, ebr_entropy_weight=args.ebr_entropy,
                            teacher=teacher, kd_weight=args.kd_weight or 1.0,
                            kd_temperature=args.kd_temperature)


def run(args) -> int:
    from ..models import check_weights_given, get_model, get_spec
    from ..qat.cli import run_folder
    from ..report import write_json
    from .budget import Budget
    from .registry import get_search, run_search

    if args.recipe:
        from .recipe import load_sdq_recipe, run_sdq_recipe

        recipe = load_sdq_recipe(args.recipe)
        check_weights_given(recipe.model, recipe.weights, args.random_init)
        out_dir = run_folder(args, "search", recipe.model, checkpoints=("search/checkpoint.pt",))
        print(f"run folder: {out_dir}")
        run_sdq_recipe(recipe, data_root=args.data_root, output_dir=out_dir,
                       plot=False if args.no_plot else None, resume=args.resume)
        return 0
    if args.method == "dqss":
        return _run_dqss(args)
    if not args.model or not args.budget:
        raise LowbitError("give --model and at least one --budget (or a --recipe)")
    if args.method != "sdq":
        get_search(args.method)  # a clear error for an unknown name
        raise LowbitError(f"search --method {args.method!r} has no command-line options yet; "
                          "run it from Python (lowbit.search.run_search) or use sdq")
    budgets = [Budget.parse(b) for b in args.budget]
    settings = _settings(args)
    if len(budgets) > 1 and settings.loss != "ce":
        raise LowbitError("a Pareto sweep (several --budget) scores by top-1; for this model "
                          "search one budget per run and evaluate each config")
    check_weights_given(args.model, args.weights, args.random_init)
    run_folder(args, "search", args.model,
               checkpoints=("checkpoint.pt",) if len(budgets) == 1 else ("*/checkpoint.pt",))
    print(f"run folder: {args.output_dir}")
    spec = get_spec(args.model)
    model = get_model(args.model, args.weights)
    train = _train_loader(spec, args)
    example = next(iter(train))[0][:2]
    progress = not args.no_progress
    plot = False if args.no_plot else None
    if len(budgets) == 1:
        result = run_search(args.method, model, train, budgets[0], example, settings,
                            progress=progress, output_dir=args.output_dir, resume=args.resume,
                            model_name=args.model)
        files = result.save(args.output_dir, plot=plot)
        print(result.table())
        print("wrote " + ", ".join(str(p) for p in files.values()))
        kd = " --kd-weight 1" if settings.loss == "ce" else ""
        print(f"retrain with: lowbit qat -m {args.model} --config {files['config']} --ebr{kd}")
        return 0

    from ..pipeline import build_data
    from .pareto import RetrainScorer, pareto_sweep

    data = build_data(spec, args.dataset, args.data_root, eval_size=args.eval_size,
                      batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    score = RetrainScorer(model, train, data.eval, example, train=_retrain_config(args),
                          loss_terms=_loss_terms(args, model, example),
                          calib_batches=args.calib_batches, progress=progress)
    sweep = pareto_sweep(model, train, budgets, example, score, settings, method=args.method,
                         progress=progress, output_dir=args.output_dir, resume=args.resume,
                         plot=plot, title=f"{args.model}: {args.method} Pareto sweep",
                         model_name=args.model)
    out = Path(args.output_dir)
    files = {k: out / f"pareto.{k}" for k in ("csv", "png") if (out / f"pareto.{k}").exists()}
    write_json(f"{args.output_dir}/sweep.json", {
        "model": args.model, "weights": args.weights, "protocol": data.protocol,
        "settings": settings.model_dump(mode="json"), "rows": sweep.rows,
    })
    print(sweep.to_csv())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0
