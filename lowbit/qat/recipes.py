"""QAT recipes: one YAML file holds a whole run (model, data, method, stages, training).

``lowbit qat --recipe recipes/qil_resnet20_cifar10_w4a4.yaml`` runs one; command-line flags
override its fields. :func:`run_recipe` is the same thing from Python.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import EdgePolicy, QuantConfig, load_yaml_model
from ..errors import ConfigError
from ..evaluate import evaluate
from . import ddp
from .api import qat
from .schedule import Stage
from .trainer import TrainConfig


class Recipe(BaseModel):
    """A complete QAT run; ``paper`` holds the numbers the recipe aims to reproduce."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    model: str
    weights: str | None = None
    dataset: str | None = None
    method: Literal["qil", "lsq"] = "qil"
    stages: list[Stage] = Field(min_length=1)
    per_channel: bool = True
    first_last: EdgePolicy = EdgePolicy.INT8
    observer: str = "mse"
    learn_gamma: bool = True
    quant_config: str | None = Field(None, description="a QuantConfig file (single stage only)")
    kd_teacher: str | None = Field(
        None, description="KD teacher: a registry model name, or 'same' (the float model)")
    kd_teacher_weights: str | None = Field(None, description="weights of kd_teacher")
    kd_weight: float | None = Field(
        None, gt=0, description="KD weight; given alone, distils from the float model (1 with "
        "only kd_teacher)")
    kd_temperature: float = Field(4.0, gt=0, description="KD softening temperature")
    ebr: float | None = Field(None, ge=0, description="EBR weight (None or 0: off)")
    ebr_entropy_weight: float = Field(0.1, ge=0, description="EBR bin-evenness term weight")
    ebr_tau: float = Field(0.1, gt=0, description="EBR soft-assignment temperature")
    train: TrainConfig = Field(default_factory=TrainConfig)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    calib_size: int = Field(1024, ge=1)
    eval_size: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)
    paper: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _distill_alias(cls, data: Any) -> Any:
        """``distill: W`` (older recipes) means ``kd_weight: W`` with the float model teaching."""
        if isinstance(data, dict) and "distill" in data:
            data = dict(data)
            weight = data.pop("distill")
            if weight is not None:
                warnings.warn("recipe field 'distill' is deprecated; use 'kd_weight'",
                              DeprecationWarning, stacklevel=2)
                if data.get("kd_weight") not in (None, weight):
                    raise ValueError("give 'kd_weight' or the deprecated 'distill', not both")
                data["kd_weight"] = weight
        return data

    @model_validator(mode="after")
    def _teacher_weights_need_a_teacher(self) -> Recipe:
        if self.kd_teacher_weights and self.kd_teacher in (None, "same"):
            raise ValueError("kd_teacher_weights needs kd_teacher MODEL (the float model already "
                             "has the recipe's weights)")
        return self

    @property
    def kd(self) -> bool:
        return self.kd_teacher is not None or self.kd_weight is not None


def load_recipe(path: str | Path) -> Recipe:
    return load_yaml_model(Recipe, path, "recipe", "; see the files under recipes/")


def recipe_loss_terms(recipe: Recipe, model: torch.nn.Module, example_inputs) -> list:
    """The recipe's KD / EBR loss terms; a teacher with other classes fails here, before training.

    ``model`` is the float model being quantized: the default (self-distillation) teacher.
    """
    from ..losses import build_loss_terms, load_teacher

    teacher = None
    if recipe.kd:
        teacher = load_teacher(recipe.kd_teacher, recipe.kd_teacher_weights, model)
        teacher = teacher.to(example_inputs.device)
    return build_loss_terms(
        model, example_inputs, ebr=recipe.ebr, ebr_entropy_weight=recipe.ebr_entropy_weight,
        ebr_tau=recipe.ebr_tau, teacher=teacher, kd_weight=recipe.kd_weight or 1.0,
        kd_temperature=recipe.kd_temperature,
    )


def run_recipe(
    recipe: Recipe,
    *,
    data_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    eval_float: bool = True,
    echo=print,
) -> dict[str, Any]:
    """Load model and data, train, evaluate; returns (and, with ``output_dir``, writes) results."""
    from ..data import load_dataset, make_loader
    from ..losses import as_hook
    from ..models import get_model, get_spec
    from ..pipeline import build_data

    ctx = ddp.init_from_env()
    torch.manual_seed(recipe.train.seed)
    spec = get_spec(recipe.model)
    data = build_data(spec, recipe.dataset, data_root, calib_size=recipe.calib_size,
                      eval_size=recipe.eval_size, batch_size=recipe.eval_batch_size,
                      workers=recipe.workers, seed=recipe.train.seed)
    kwargs = dict(mean=spec.mean, std=spec.std, crop=spec.input_size[-1])
    if spec.resize is not None:
        kwargs["resize"] = spec.resize
    train_set = load_dataset(data.dataset, data_root, "train", **kwargs)
    if ctx.enabled:
        train_loader = ddp.shard_loader(train_set, recipe.batch_size, ctx, recipe.train.seed,
                                        recipe.workers)
    else:
        train_loader = make_loader(train_set, recipe.batch_size, shuffle=True,
                                   workers=recipe.workers, seed=recipe.train.seed)
    model = get_model(recipe.model, recipe.weights).to(ctx.device)
    config = QuantConfig.load(recipe.quant_config) if recipe.quant_config else None
    if config is not None and len(recipe.stages) > 1:
        raise ConfigError("quant_config applies to a single stage; drop the extra stages")
    hooks = [as_hook(t) for t in recipe_loss_terms(recipe, model, data.example.to(ctx.device))]
    progress = recipe.train.progress and ctx.is_main
    float_top1 = None
    if eval_float and ctx.is_main:
        float_top1 = evaluate(model, data.eval, progress=progress, desc="eval float").top1
        echo(f"float {recipe.model}: top-1 {float_top1:.2f} % ({data.protocol})")

    def eval_fn(m):
        if not ctx.is_main:
            return {}
        return {"top1": evaluate(m, data.eval, progress=False).top1}

    t0 = time.perf_counter()
    result = qat(
        model, recipe.method, train_loader, calib_data=data.calib, example_inputs=data.example,
        stages=recipe.stages, config=config, train=recipe.train, hooks=hooks,
        output_dir=output_dir, resume=resume, model_name=recipe.model, dist_ctx=ctx,
        config_options=dict(per_channel=recipe.per_channel, first_last=recipe.first_last.value,
                            observer=recipe.observer, learn_gamma=recipe.learn_gamma),
        eval_fn=eval_fn,
    )
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "recipe": recipe.model_dump(mode="json"), "protocol": data.protocol,
        "float_top1": float_top1, "train_seconds": seconds, "history": result.history,
        "world_size": ctx.world_size,
    }
    if ctx.is_main:
        final = [r for r in result.history if "top1" in r]
        out["top1"] = final[-1]["top1"] if final else evaluate(
            result.model, data.eval, progress=False).top1
        for row in result.history:
            echo(f"stage {row['stage']} {row.get('bits', '')} epoch {row['epoch']}: loss "
                 f"{row['loss']:.4f} train {row['train_acc']:.2f} %"
                 + (f" top-1 {row['top1']:.2f} %" if "top1" in row else ""))
        if output_dir is not None:
            from ..pipeline import save_quantized
            from ..report import write_json

            save_quantized(result.model, Path(output_dir) / "model",
                           {"model": recipe.model, "method": recipe.method})
            write_json(Path(output_dir) / "results.json", out)
    out["model"] = result.model
    return out
