"""Progressive fine-tuning: a list of bit settings trained in sequence, each stage starting from
the previous one (QIL: float -> 5/5 -> 4/4 -> 3/3 -> 2/2).

Between stages only the bitwidths change; the learned parameters carry over. A QIL interval
means the same thing at any bitwidth, so it is kept as is; an LSQ step size is rescaled so the
clipping range stays where training left it. ``stage_init: calibrate`` instead re-initialises
every quantizer with its range observer at the new bits (on a few training batches, with the
trained weights), because on ResNet-20 the 3-bit intervals were a worse start for 2 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..nn.layers import QUANT_LAYERS
from ..prepare import calibrate, quant_layers, type_label
from ..quant.base import MAX_BITS, MIN_BITS, Quantizer
from ..quant.lsq import LSQQuantizer
from .checkpoint import load_checkpoint
from .hooks import TrainHook
from .trainer import TrainConfig, Trainer


class Stage(BaseModel):
    """One stage: bits of weights and activations, with optional per-stage training overrides."""

    model_config = ConfigDict(extra="forbid")

    w_bits: int = Field(ge=MIN_BITS, le=MAX_BITS)
    a_bits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS)
    epochs: int | None = Field(None, ge=0)
    lr: float | None = Field(None, gt=0)
    quant_lr: float | None = Field(None, gt=0)
    freeze_weights: bool | None = None

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits if self.a_bits is not None else 'float'}"

    def train_config(self, base: TrainConfig) -> TrainConfig:
        updates = {k: getattr(self, k) for k in ("epochs", "lr", "quant_lr", "freeze_weights")
                   if getattr(self, k) is not None}
        return base.model_copy(update=updates)


def parse_stages(text: str) -> list[Stage]:
    """``"5/5,4/4,3/3"`` (weights/activations; ``4/float`` keeps activations float)."""
    stages = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        w, _, a = part.partition("/")
        try:
            stages.append(Stage(w_bits=int(w), a_bits=None if a in {"float", "32"} else int(a or w)))
        except (ValueError, TypeError):
            raise ConfigError(
                f"bad stage {part!r}: write W/A bit pairs separated by commas, e.g. 5/5,4/4,3/3"
            ) from None
    if not stages:
        raise ConfigError("the progressive schedule is empty; give e.g. 5/5,4/4")
    return stages


def _set_bits(q: Quantizer, bits: int) -> None:
    if q.bits == bits:
        return
    if isinstance(q, LSQQuantizer):
        old = q.qrange[1]
        q.set_bits(bits)
        q.load_params({"scale": q.params()["scale"] * (old / max(q.qrange[1], 1))})
        return
    q.set_bits(bits)


def apply_bits(model: nn.Module, config: QuantConfig) -> dict[str, tuple[int, int]]:
    """Set every quantizer's bits to what ``config`` resolves for its layer (same policy
    rules as ``prepare``); returns the new ``{layer: (w_bits, a_bits)}``."""
    reverse = {v: k for k, v in QUANT_LAYERS.items()}
    layers = list(quant_layers(model))
    # every quantizable layer, kept-float ones too, with prepare's first/last layers at the
    # ends: a config that keeps the edges float (the PAMS policy of SR nets) resolves as it did
    named = [(n, type_label(m, reverse[type(m)]) if type(m) in reverse else type_label(m))
             for n, m in model.named_modules() if type(m) in reverse or type(m) in QUANT_LAYERS]
    report = getattr(model, "lowbit_report", None)
    for edge, at in ((getattr(report, "first_layer", None), 0),
                     (getattr(report, "last_layer", None), None)):
        item = next((x for x in named if x[0] == edge), None)
        if item is not None:
            named.remove(item)
            named.insert(len(named) if at is None else 0, item)
    plans = config.resolve(named)
    out = {}
    for name, mod in layers:
        plan = plans[name]
        for q, spec in ((mod.weight_quant, plan.weight), (mod.input_quant, plan.act)):
            if q is None:
                continue
            if spec is None:
                raise ConfigError(
                    f"stage config keeps {name} in float but the model quantizes it; progressive "
                    "stages may change bits only, not which layers are quantized"
                )
            _set_bits(q, spec.bits)
        out[name] = (mod.w_bits, mod.a_bits)
    return out


def run_stages(
    model: nn.Module,
    stages: Sequence[Stage],
    stage_config,
    train_data,
    train: TrainConfig,
    *,
    hooks: Sequence[TrainHook] = (),
    output_dir: str | Path | None = None,
    run_info: dict[str, Any] | None = None,
    eval_fn=None,
    resume: bool | str | Path = False,
    dist_ctx=None,
) -> list[dict[str, Any]]:
    """Train ``stages`` in order on a prepared, calibrated model; ``stage_config(stage)`` gives
    the :class:`QuantConfig` of a stage. Resuming skips the stages a checkpoint has finished."""
    run_info = dict(run_info or {})
    run_info["stages"] = [s.model_dump() for s in stages]
    run_info.setdefault("train", train.identity())
    ckpt_path = None
    if resume:
        ckpt_path = Path(resume) if resume is not True else (
            Path(output_dir) / "checkpoint.pt" if output_dir is not None else None)
    done_stage = -1
    if ckpt_path is not None and ckpt_path.is_file():
        done_stage = int(load_checkpoint(ckpt_path).get("stage", 0))
    history: list[dict[str, Any]] = []
    for i, stage in enumerate(stages):
        if i < done_stage:
            continue
        apply_bits(model, stage_config(stage))
        if i > 0 and i != done_stage and train.stage_init == "calibrate":
            # DDP broadcasts rank 0's parameters when the stage's trainer wraps the model, so
            # ranks calibrating on different shards still start the stage identical.
            calibrate(model, train_data, num_batches=train.stage_calib_batches, progress=False)
        trainer = Trainer(model, train_data, stage.train_config(train), hooks=hooks,
                          output_dir=output_dir, run_info=run_info, eval_fn=eval_fn, stage=i,
                          stage_label=stage.label, dist_ctx=dist_ctx)
        trainer.history = history
        if i == done_stage:
            trainer.resume(ckpt_path)
        trainer.fit()
        history = trainer.history
    return history
