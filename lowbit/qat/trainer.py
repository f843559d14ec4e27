"""The QAT trainer shared by every quantization-aware method (QIL, LSQ, mixed precision).

It trains a *prepared and calibrated* model. Design choices, each for a reason:

* quantizer parameters get their own learning rate and weight decay (their gradients have
  another scale than the weights');
* the learning rate is a pure function of the global step, so a resumed run needs no
  scheduler state and is bit-identical to an uninterrupted one;
* each epoch re-seeds the data order and torch's RNG from ``seed + epoch`` for the same reason
  (``reseed=False`` instead continues one random stream across epochs, as a search that cycles
  its data does, and stores the generators' states in the checkpoint);
* a hook may stop the run early (:meth:`Trainer.stop`); the checkpoint records it, so resuming
  a finished run trains no further;
* loss, accuracy and a NaN flag accumulate on the device and are read only every
  ``log_every`` steps (no per-step ``.item()``);
* a checkpoint is written atomically after every epoch that ended healthy (finite loss, no
  collapsed quantizer, replicas in sync), so a failure always leaves the last good one.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import ConfigError, TrainingError
from ..memory import reusing_freed_memory
from ..prepare import BN_TYPES, quantizers
from ..utils import atomic_write_text, model_device
from . import ddp
from .augment import Augment, augment_batch
from .checkpoint import CHECKPOINT_NAME, check_run, load_checkpoint, save_checkpoint
from .hooks import StepContext, TrainHook

log = logging.getLogger("lowbit")

# fields that change how a run is reported, not what it computes (free to differ on resume)
COSMETIC = {"progress", "log_every", "logger"}


class TrainConfig(BaseModel):
    """Every training option; the CLI flags and recipe files map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=0, description="epochs (per stage in a progressive schedule)")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="cut every epoch after this many steps (short runs)"
    )
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(5e-4, gt=0, description="learning rate of weights, biases, BN")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0, description="decay of conv/linear weights only")
    quant_lr: float | None = Field(
        5e-3, gt=0, description="quantizer parameters (None: same as lr)"
    )
    quant_weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="'step' schedule: fractions of the run where lr is multiplied by step_gamma",
    )
    step_gamma: float = Field(0.1, gt=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    bn: Literal["fold", "train", "freeze"] = Field(
        "fold", description="fold BN into weights, train it, or freeze its statistics and affine"
    )
    freeze_weights: bool = Field(False, description="train the quantizers only")
    stage_init: Literal["keep", "calibrate"] = Field(
        "keep", description="progressive schedules: at each new stage keep the learned "
        "quantizer parameters (the paper) or re-initialise them with the range observer at the "
        "new bits on stage_calib_batches training batches")
    stage_calib_batches: int = Field(8, ge=1)
    channels_last: bool = True
    augment: Augment = Field(
        "none", description="batch augmentation: none, flip, or crop-flip (CIFAR: pad 4, crop, flip)"
    )
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm")
    loss: str = Field(
        "ce", description="task loss: ce (classification: cross-entropy on the labels), l1 or "
        "l2 (super-resolution: pixel error against the HR image), or kd (none: a KD hook's "
        "distillation term is the whole loss, so the training data need no labels)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    log_every: int = Field(50, ge=1)
    logger: Literal["csv", "tensorboard", "none"] = "csv"
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of the run, each in (0, 1)")
        from lowbit.tasks import loss_names

        if self.loss not in loss_names():
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(loss_names())}")
        if self.loss != "ce" and self.label_smoothing:
            raise ValueError(f"label_smoothing applies to the cross-entropy; loss "
                             f"{self.loss!r} has none")
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that determine the result (compared when resuming). ``loss`` at its
        default is left out, as in the checkpoints written before it existed."""
        return {k: v for k, v in self.model_dump(mode="json").items()
                if k not in COSMETIC and not (k == "loss" and v == "ce")}


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rates at ``step`` of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = step / max(total, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(frac >= m for m in cfg.milestones)
    return 1.0


def quantizer_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for q in quantizers(model) for p in q.parameters(recurse=False)}


def apply_freezing(model: nn.Module, cfg: TrainConfig) -> None:
    """Quantizer-only training and frozen BatchNorm via ``requires_grad`` on the non-quantizer
    parameters (set both ways, so a later stage can unfreeze what an earlier one froze)."""
    qids = quantizer_param_ids(model)
    bn_ids = {id(p) for m in model.modules() if isinstance(m, BN_TYPES) for p in m.parameters()}
    for p in model.parameters():
        if id(p) in qids:
            continue
        frozen = cfg.freeze_weights or (cfg.bn == "freeze" and id(p) in bn_ids)
        p.requires_grad_(not frozen)


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, extra: Sequence[dict[str, Any]] = ()
) -> torch.optim.Optimizer:
    """Three groups: decayed weights, undecayed biases/BN, quantizer parameters; then the
    ``extra`` groups hooks ask for (their parameters leave the three, e.g. SDQ's bitwidth
    parameters with their own learning rate)."""
    qids = quantizer_param_ids(model)
    claimed = {id(p) for g in extra for p in g["params"]}
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "other": [], "quant": []}
    for p in model.parameters():
        if not p.requires_grad or id(p) in claimed:
            continue
        key = "quant" if id(p) in qids else ("weights" if p.dim() > 1 else "other")
        groups[key].append(p)
    qlr = cfg.quant_lr if cfg.quant_lr is not None else cfg.lr
    specs = [
        dict(params=groups["weights"], lr=cfg.lr, weight_decay=cfg.weight_decay, name="weights"),
        dict(params=groups["other"], lr=cfg.lr, weight_decay=0.0, name="other"),
        dict(params=groups["quant"], lr=qlr, weight_decay=cfg.quant_weight_decay, name="quant"),
    ]
    specs += [{"weight_decay": 0.0, **g, "params": list(g["params"])} for g in extra]
    specs = [g for g in specs if g["params"]]
    for g in specs:
        g["base_lr"] = g["lr"]
    if not specs:
        raise ConfigError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(specs, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.Adam(specs, lr=cfg.lr)


class _Logger:
    """Step-level scalars to ``steps.csv`` (appended) or TensorBoard; epoch rows go to
    ``history.csv``, rewritten from the checkpointed history so it always matches it."""

    def __init__(self, directory: Path | None, kind: str, enabled: bool):
        self.directory = directory
        self.kind = kind if (directory is not None and enabled) else "none"
        self.writer = None
        if self.kind != "none":
            directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "logger 'tensorboard' needs the tensorboard package: pip install tensorboard, "
                    "or use the csv logger"
                ) from None
            self.writer = SummaryWriter(str(directory / "tensorboard"))

    def step(self, row: dict[str, Any]) -> None:
        if self.kind == "csv":
            path = self.directory / "steps.csv"
            new = not path.exists()
            with path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
        elif self.writer is not None:
            for k, v in row.items():
                if k not in {"stage", "epoch", "step"}:
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def history(self, rows: list[dict[str, Any]]) -> None:
        if self.kind == "none" or not rows:
            return
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        lines = [",".join(fields)]
        lines += [",".join(str(r.get(k, "")) for k in fields) for r in rows]
        atomic_write_text(self.directory / "history.csv", "\n".join(lines) + "\n")
        if self.writer is not None:
            last = rows[-1]
            for k, v in last.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"epoch/{k}", v, last["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_steps(path: Path, stage: int, step: int) -> None:
    """Drop the ``steps.csv`` rows logged after the checkpoint at (``stage``, ``step``): an
    interrupted epoch is trained again on resume and would log its steps twice."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    keep = [r for r in rows if (int(r["stage"]), int(r["step"])) <= (stage, step)]
    if fields and len(keep) < len(rows):
        lines = [",".join(fields)] + [",".join(r[k] for k in fields) for r in keep]
        atomic_write_text(path, "\n".join(lines) + "\n")


def train_acc_text(row: dict[str, Any]) -> str:
    """``, train A %`` for an epoch row, empty when its images had no labels."""
    return f", train {row['train_acc']:.2f} %" if "train_acc" in row else ""


def _eval_text(row: dict[str, Any], keys: Sequence[str]) -> str:
    """The epoch's evaluation metrics (``keys``, those ``eval_fn`` returned) for its log line."""
    if "top1" in row:
        return f", top-1 {row['top1']:.2f} %"
    return "".join(f", {k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), float))


def _inputs_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch.get("input", batch.get("image")), batch["target"]
    return batch[0], batch[1]


class Trainer:
    """Train a prepared, calibrated model; see the module docstring for the guarantees.

    ``run_info`` (model name, method, configs) is stored in every checkpoint and compared on
    resume. ``eval_fn(model) -> dict`` adds evaluation metrics to each epoch's row.
    ``reseed=False`` keeps one random stream over all epochs (see the module docstring).
    ``float_ok=True`` trains a model without quantizers (e.g. a float super-resolution net with
    an L1 ``criterion``); accuracy is counted only for class-index targets.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Iterable,
        config: TrainConfig | None = None,
        *,
        hooks: Sequence[TrainHook] = (),
        output_dir: str | Path | None = None,
        run_info: dict[str, Any] | None = None,
        eval_fn=None,
        criterion=None,
        stage: int = 0,
        stage_label: str = "",
        dist_ctx: ddp.DistContext | None = None,
        reseed: bool = True,
        float_ok: bool = False,
    ):
        self.model = model
        self.data = train_data
        self.cfg = config or TrainConfig()
        self.hooks = list(hooks)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.run_info = dict(run_info or {})
        self.run_info.setdefault("train", self.cfg.identity())
        self.eval_fn = eval_fn
        self.criterion = criterion
        self._task_loss = None
        self._eval_keys: list[str] = []
        self.stage = stage
        self.stage_label = stage_label
        self.ctx = dist_ctx or ddp.current()
        self.reseed = reseed
        self.stopped = False
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_opt: dict[str, Any] | None = None
        if not float_ok and not any(True for _ in quantizers(model)):
            raise ConfigError(
                "the model has no quantizers: prepare and calibrate it first "
                "(lowbit.prepare + lowbit.calibrate), or use lowbit.qat.qat()"
            )

    @property
    def checkpoint_path(self) -> Path | None:
        return self.output_dir / CHECKPOINT_NAME if self.output_dir is not None else None

    def steps_per_epoch(self) -> int:
        try:
            n = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            if self.cfg.max_steps_per_epoch is None:
                raise ConfigError(
                    "the training data has no len(): set max_steps_per_epoch"
                ) from None
            return self.cfg.max_steps_per_epoch
        if self.cfg.max_steps_per_epoch is not None:
            n = min(n, self.cfg.max_steps_per_epoch)
        if n == 0:
            raise ConfigError("the training data is empty: pass at least one batch")
        return n

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.criterion is not None:
            return self.criterion(out, y)
        if self.cfg.loss == "kd":
            return out.new_zeros(())  # the KD hook's term is the whole loss; y is never read
        if self._task_loss is None:
            from lowbit.tasks import loss_function

            self._task_loss = loss_function(self.cfg.loss, self.cfg)
        return self._task_loss(out, y)

    def _check_loss(self) -> None:
        """Label-free training needs its distillation term; cross-entropy needs labels."""
        if self.criterion is not None:
            return
        if self.cfg.loss == "kd" and not any(h.name == "kd" for h in self.hooks):
            raise ConfigError(
                "loss 'kd' trains on the distillation term alone but no KD hook was given: pass "
                "hooks=[lowbit.losses.as_hook(KnowledgeDistillation(teacher))]"
            )
        if self.cfg.loss == "ce" and not getattr(getattr(self.data, "dataset", self.data),
                                                 "labeled", True):
            raise ConfigError(
                "the training images have no labels, so the cross-entropy loss cannot train on "
                "them: use loss 'kd' (--loss kd), which distils from the float model"
            )

    def stop(self) -> None:
        """End the run after the current step (a hook's decision, e.g. a search that met its
        budget); the epoch's row and checkpoint are still written."""
        self.stopped = True

    def _set_epoch(self, epoch: int) -> None:
        seed = self.cfg.seed * 100003 + self.stage * 1009 + epoch
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.stage * 1009 + epoch)
        if not self.reseed:
            return
        torch.manual_seed(seed)
        gen = getattr(self.data, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """The generators an unseeded epoch draws from: torch's, the device's, the loader's."""
        state = {"torch": torch.get_rng_state()}
        dev = model_device(self.model)
        if dev.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(dev)
        gen = getattr(self.data, "generator", None)
        if isinstance(gen, torch.Generator):
            state["data"] = gen.get_state()
        return state

    def _set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], model_device(self.model))
        gen = getattr(self.data, "generator", None)
        if "data" in state and isinstance(gen, torch.Generator):
            gen.set_state(state["data"])

    def _train_mode(self, module: nn.Module) -> None:
        module.train()
        if self.cfg.bn == "freeze":
            for m in module.modules():
                if isinstance(m, BN_TYPES):
                    m.eval()

    def resume(self, path: str | Path | None = None) -> bool:
        """Load model, optimizer, hooks and progress from a checkpoint; False if there is none
        (``path`` None: this trainer's own checkpoint)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not path.is_file():
            return False
        ckpt = load_checkpoint(path)
        check_run(self.run_info, ckpt, path)
        state = ckpt["model"]
        own = self.model.state_dict()
        bad = sorted(set(own) ^ set(state))
        if bad:
            raise TrainingError(
                f"checkpoint {path} holds another architecture ({len(bad)} differing keys, "
                f"first {bad[0]!r}); resume with the model it was written for"
            )
        if ckpt.get("stage", 0) != self.stage:
            return False
        self.model.load_state_dict(state)
        self._pending_opt = ckpt.get("optimizer")
        for hook, hs in zip(self.hooks, ckpt.get("hooks", []), strict=False):
            hook.load_state_dict(hs)
        self.epoch = int(ckpt["epoch"])
        if self.epoch > self.cfg.epochs:
            raise TrainingError(
                f"checkpoint {path} has trained {self.epoch} epochs of stage {self.stage}, more "
                f"than the {self.cfg.epochs} asked for: give --epochs {self.epoch} or more (a run "
                "can be extended on resume, not shortened)"
            )
        self.global_step = int(ckpt["global_step"])
        self.history = list(ckpt.get("history", []))
        self.stopped = bool(ckpt.get("stopped", False))
        if self.output_dir is not None and self.cfg.logger == "csv" and self.ctx.is_main:
            truncate_steps(self.output_dir / "steps.csv", self.stage, self.global_step)
        if not self.reseed and "rng" in ckpt:
            self._set_rng_state(ckpt["rng"])
        return True

    def _save(self) -> None:
        if self.checkpoint_path is None or not self.ctx.is_main:
            return
        extra = {} if self.reseed else {"rng": self._rng_state()}
        save_checkpoint(self.checkpoint_path, {
            "run": self.run_info,
            "stage": self.stage,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "hooks": [h.state_dict() for h in self.hooks],
            "history": self.history,
            "stopped": self.stopped,
            **extra,
        })

    def _check_health(self, bad: torch.Tensor, where: str) -> None:
        """One sync: NaN/Inf loss anywhere since the last check, or a collapsed quantizer."""
        flags = [bad.reshape(())]
        named = [(q.name or type(q).__name__, q) for q in quantizers(self.model)
                 if hasattr(q, "collapsed")]
        flags += [q.collapsed().reshape(()) for _, q in named]
        status = ddp.all_reduce_sum(torch.stack(flags).to(torch.float32), self.ctx).cpu()
        keep = (f"the last good checkpoint {self.checkpoint_path} was kept"
                if self.checkpoint_path is not None and self.checkpoint_path.exists()
                else "no checkpoint was written")
        if status[0] > 0:
            raise TrainingError(
                f"the loss became NaN/Inf ({where}); {keep}. Lower --lr / --quant-lr, "
                "set --grad-clip, or check the input data"
            )
        collapsed = [n for (n, _), s in zip(named, status[1:].tolist(), strict=True) if s > 0]
        if collapsed:
            raise TrainingError(
                f"the quantization interval of {', '.join(collapsed[:3])} collapsed (d -> 0 or "
                f"not finite) ({where}); {keep}. Lower --quant-lr or raise the bits of that layer"
            )

    @reusing_freed_memory
    def fit(self, resume: bool | str | Path = False) -> list[dict[str, Any]]:
        """Train to ``config.epochs``; returns one metrics row per epoch of this stage."""
        cfg = self.cfg
        self._check_loss()
        if resume:
            self.resume(None if resume is True else resume)
        dev = model_device(self.model)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        apply_freezing(self.model, cfg)
        self.optimizer = build_optimizer(
            self.model, cfg, [g for h in self.hooks for g in h.param_groups(self.model)])
        if self._pending_opt:
            self.optimizer.load_state_dict(self._pending_opt)
            self._pending_opt = None
        net = ddp.wrap(self.model, self.ctx)
        logger = _Logger(self.output_dir, cfg.logger, self.ctx.is_main)
        steps = self.steps_per_epoch()
        total = steps * cfg.epochs
        for h in self.hooks:
            h.on_train_start(self)
        try:
            while self.epoch < cfg.epochs and not self.stopped:
                row = self._epoch(net, dev, steps, total, logger)
                self.history.append(row)
                if self.ctx.is_main:
                    log.info("stage %d epoch %d/%d: loss %.4f%s%s (%.1f s)",
                             self.stage, row["epoch"], cfg.epochs, row["loss"], train_acc_text(row),
                             _eval_text(row, self._eval_keys),
                             row["seconds"])
                for h in self.hooks:
                    h.on_epoch_end(self, self.epoch, row)
                self.epoch += 1
                self._save()
                logger.history(self.history)
                ddp.barrier(self.ctx)
        finally:
            logger.close()
        self.model.eval()
        return [r for r in self.history if r.get("stage", 0) == self.stage]

    def _epoch(self, net: nn.Module, dev, steps: int, total: int, logger: _Logger) -> dict:
        from tqdm.auto import tqdm

        cfg, opt, epoch = self.cfg, self.optimizer, self.epoch
        self._set_epoch(epoch)
        self._train_mode(net)
        for h in self.hooks:
            h.on_epoch_start(self, epoch)
        zero = lambda: torch.zeros((), device=dev)  # noqa: E731
        loss_sum, task_sum, correct, count, bad = zero(), zero(), zero(), zero(), zero()
        labeled = zero()
        extra_sums = {h.name: zero() for h in self.hooks}
        w_loss, w_correct, w_count, w_labeled = zero(), zero(), zero(), zero()
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"stage {self.stage} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.ctx.is_main), leave=False)
        seen = 0
        for i, batch in enumerate(self.data):
            if i >= steps:
                break
            x, y = _inputs_targets(batch)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            x = augment_batch(x, cfg.augment)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            factor = lr_factor(cfg, self.global_step, total)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            out = net(x)
            task = self._loss(out, y)
            loss = task
            ctx = StepContext(self.model, x, y, out, task, epoch, self.global_step, self.stage)
            for h in self.hooks:
                term = h.extra_loss(ctx)
                if term is not None:
                    loss = loss + term
                    extra_sums[h.name] += term.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            for h in self.hooks:
                h.on_step_end(ctx)
            ld = loss.detach()
            bad += ~torch.isfinite(ld)
            if y.dim() == 1 and out.dim() == 2:  # class labels (UNLABELED targets are -1)
                known = y >= 0
                hits = ((out.detach().argmax(1) == y) & known).sum()
            else:  # an image-shaped task (super-resolution): no accuracy
                known = torch.zeros_like(y, dtype=torch.bool).flatten(1).any(1)
                hits = zero()
            n = y.shape[0]
            loss_sum += ld * n
            task_sum += task.detach() * n
            correct += hits
            count += n
            labeled += known.sum()
            w_loss += ld * n
            w_correct += hits
            w_count += n
            w_labeled += known.sum()
            self.global_step += 1
            seen += 1
            bar.update(1)
            if seen % cfg.log_every == 0:
                self._check_health(bad, f"stage {self.stage}, epoch {epoch + 1}, step {seen}")
                wl = float(w_loss / w_count)
                wa = 100.0 * float(w_correct / w_labeled)  # NaN without labels
                bar.set_postfix(loss=f"{wl:.3f}", acc=f"{wa:.1f}")
                logger.step(dict(stage=self.stage, epoch=epoch, step=self.global_step,
                                 lr=opt.param_groups[0]["lr"], loss=wl, acc=wa))
                w_loss, w_correct, w_count, w_labeled = zero(), zero(), zero(), zero()
            if self.stopped:
                break
        bar.close()
        if seen == 0:
            raise ConfigError("the training data yielded no batch")
        self._check_health(bad, f"stage {self.stage}, end of epoch {epoch + 1}")
        ddp.check_in_sync(self.model, self.ctx)
        sums = ddp.all_reduce_sum(
            torch.stack([loss_sum, task_sum, correct, count, labeled]), self.ctx)
        ls, ts, cr, ct, lb = sums.tolist()
        row: dict[str, Any] = dict(
            stage=self.stage, bits=self.stage_label, epoch=epoch + 1, steps=seen, loss=ls / ct, task_loss=ts / ct,
            **({"train_acc": 100.0 * cr / lb} if lb else {}), seconds=time.perf_counter() - t0,
            **{f"loss_{k}": float(v) / seen for k, v in extra_sums.items()},
        )
        if self.eval_fn is not None:
            self.model.eval()
            scores = self.eval_fn(self.model)
            self._eval_keys = list(scores)
            row.update(scores)
        return row
