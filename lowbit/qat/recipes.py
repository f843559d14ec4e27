"""QAT recipes: one YAML file holds a whole run (model, data, method, stages, training).

``lowbit qat --recipe recipes/qil_resnet20_cifar10_w4a4.yaml`` runs one; command-line flags
override its fields. :func:`run_recipe` is the same thing from Python.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import EdgePolicy, QuantConfig, load_yaml_model
from ..errors import ConfigError
from ..evaluate import evaluate
from ..losses import KD_TEMPERATURE, SAME_TEACHER
from . import ddp
from .api import qat
from .schedule import Stage
from .trainer import TrainConfig, train_acc_text

EBR_ENTROPY_WEIGHT = 0.1
EBR_TAU = 0.1

# constraints shared by both recipe spellings of KD / EBR (nested specs and flat QAT fields)
KDWeight = Annotated[float, Field(gt=0, description="KD loss weight")]
KDTemperature = Annotated[float, Field(gt=0, description="KD softening temperature")]
EBRWeight = Annotated[float, Field(ge=0, description="EBR weight (0: off)")]
EBREntropyWeight = Annotated[float, Field(ge=0, description="EBR bin-evenness term weight")]
EBRTau = Annotated[float, Field(gt=0, description="EBR soft-assignment temperature")]


def _check_teacher_weights(teacher: str | None, teacher_weights: str | None) -> None:
    if teacher_weights and teacher in (None, SAME_TEACHER):
        raise ValueError("kd_teacher_weights needs kd_teacher MODEL (the float model already "
                         "has the recipe's weights)")


class EBRSpec(BaseModel):
    """Entropy-aware bin regularization of a recipe."""

    model_config = ConfigDict(extra="forbid")

    weight: EBRWeight = 1e-2
    entropy_weight: EBREntropyWeight = EBR_ENTROPY_WEIGHT
    tau: EBRTau = EBR_TAU


class KDSpec(BaseModel):
    """Distillation of a recipe; ``teacher: same`` distils from the float model being quantized."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = SAME_TEACHER
    teacher_weights: str | None = None
    temperature: KDTemperature = KD_TEMPERATURE
    weight: KDWeight = 1.0

    @model_validator(mode="after")
    def _teacher_weights_need_a_teacher(self) -> KDSpec:
        _check_teacher_weights(self.teacher, self.teacher_weights)
        return self


class RecipeBase(BaseModel):
    """The fields every recipe shares (model, data, batches, training, paper), and its KD / EBR
    loss terms; :class:`Recipe` (QAT) and ``lowbit.search.recipe.SDQRecipe`` add their own, so
    both validate and default the common part identically.

    A subclass says how it spells KD and EBR through :meth:`kd_spec` and :meth:`ebr_spec`.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    model: str
    weights: str | None = None
    dataset: str | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    calib_size: int = Field(1024, ge=1)
    eval_size: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0)
    paper: dict[str, Any] = Field(default_factory=dict, description="numbers it aims to reproduce")

    def kd_spec(self) -> KDSpec | None:
        return None

    def ebr_spec(self) -> EBRSpec | None:
        return None

    def loss_terms(self, model: torch.nn.Module, example_inputs) -> list:
        """The KD / EBR loss terms; a teacher with other classes fails here, before training.

        ``model`` is the float model being quantized: the ``same`` (self-distillation) teacher.
        """
        from ..losses import build_loss_terms, load_teacher

        kd, ebr = self.kd_spec(), self.ebr_spec()
        teacher = None
        if kd is not None:
            teacher = load_teacher(kd.teacher, kd.teacher_weights, model).to(example_inputs.device)
        return build_loss_terms(
            model, example_inputs, teacher=teacher,
            kd_weight=kd.weight if kd else 1.0,
            kd_temperature=kd.temperature if kd else KD_TEMPERATURE,
            ebr=ebr.weight if ebr else None,
            ebr_entropy_weight=ebr.entropy_weight if ebr else EBR_ENTROPY_WEIGHT,
            ebr_tau=ebr.tau if ebr else EBR_TAU,
        )


class Recipe(RecipeBase):
    """A complete QAT run. KD and EBR are flat fields here (they mirror ``lowbit qat`` flags)."""

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
    kd_weight: KDWeight | None = Field(
        None, description="KD weight; given alone, distils from the float model (1 with "
        "only kd_teacher)")
    kd_temperature: KDTemperature = KD_TEMPERATURE
    ebr: EBRWeight | None = Field(None, description="EBR weight (None or 0: off)")
    ebr_entropy_weight: EBREntropyWeight = EBR_ENTROPY_WEIGHT
    ebr_tau: EBRTau = EBR_TAU
    train_dataset: str | None = Field(
        None, description="dataset of the training images (default: the evaluation dataset's; "
        "'images': any folder of unlabeled images, for train.loss 'kd')")
    calib_dataset: str | None = Field(
        None, description="dataset of the calibration images (default: the training images')")
    patch: int | None = Field(
        None, ge=1, description="super-resolution: the HR training patch side (default the "
        "model's input_size x scale)")

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
        _check_teacher_weights(self.kd_teacher, self.kd_teacher_weights)
        return self

    @property
    def kd(self) -> bool:
        return (self.kd_teacher is not None or self.kd_weight is not None
                or self.train.loss == "kd")

    def kd_spec(self) -> KDSpec | None:
        if not self.kd:
            return None
        return KDSpec(teacher=self.kd_teacher or SAME_TEACHER,
                      teacher_weights=self.kd_teacher_weights,
                      temperature=self.kd_temperature, weight=self.kd_weight or 1.0)

    def ebr_spec(self) -> EBRSpec | None:
        if not self.ebr:
            return None
        return EBRSpec(weight=self.ebr, entropy_weight=self.ebr_entropy_weight, tau=self.ebr_tau)


def load_recipe(path: str | Path) -> Recipe:
    return load_yaml_model(Recipe, path, "recipe", "; see the files under recipes/")


def resolve_loss(recipe: RecipeBase) -> RecipeBase:
    """``recipe`` with its loss checked against the model's task, the task's default loss
    (``ce`` for classifiers, ``l1`` for super-resolution) standing in for an unset one."""
    from ..models import get_spec
    from ..tasks import check_loss_task, get_task

    spec = get_spec(recipe.model)
    if "loss" not in recipe.train.model_fields_set and recipe.train.loss not in (
            get_task(spec.task).losses):
        train = recipe.train.model_copy(update={"loss": get_task(spec.task).losses[0]})
        recipe = recipe.model_copy(update={"train": train})
    check_loss_task(spec, recipe.train.loss)
    kd = recipe.kd_spec()
    if kd is not None and not get_task(spec.task).distillation:
        raise ConfigError(f"distillation (kd_teacher / kd_weight) compares class logits; "
                          f"{spec.name} is a {spec.task.replace('_', '-')} model: drop it")
    return recipe


def train_source(
    recipe: Recipe, data_root: str | Path | None = None, train_root: str | Path | None = None
) -> tuple[str, str | Path | None]:
    """The dataset and folder of the training images: ``train_root`` without a
    ``train_dataset`` is a folder of unlabeled ``images``; the evaluation dataset's training
    split otherwise. A loss the images cannot feed (cross-entropy without labels) is refused
    here, before any loading.
    """
    from ..models import get_spec
    from ..tasks import get_task

    spec = get_spec(recipe.model)
    task = get_task(spec.task)
    eval_name = (recipe.dataset or spec.default_dataset).lower()
    name = (recipe.train_dataset or ("images" if train_root is not None
                                     else task.train_dataset(eval_name))).lower()
    root = train_root if train_root is not None else (data_root if name == eval_name else None)
    task.check_training(spec, recipe.train.loss, name)
    return name, root


def run_recipe(
    recipe: Recipe,
    *,
    data_root: str | Path | None = None,
    train_root: str | Path | None = None,
    calib_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    eval_float: bool = True,
    echo=print,
) -> dict[str, Any]:
    """Load model and data, train, evaluate; returns (and, with ``output_dir``, writes) results.

    Training images come from :func:`train_source`; the quantizers' calibration images from
    ``calib_root`` / ``recipe.calib_dataset`` if given, else from the training images.
    """
    from ..data import make_loader
    from ..losses import as_hook
    from ..models import get_model, get_spec
    from ..pipeline import build_data
    from ..tasks import get_task

    ctx = ddp.init_from_env()
    recipe = resolve_loss(recipe)
    torch.manual_seed(recipe.train.seed)
    spec = get_spec(recipe.model)
    task = get_task(spec.task)
    train_name, train_folder = train_source(recipe, data_root, train_root)
    calib_dataset = recipe.calib_dataset
    if calib_root is None and calib_dataset is None and (
            train_root is not None or recipe.train_dataset is not None):
        calib_dataset, calib_root = train_name, train_folder
    data = build_data(spec, recipe.dataset, data_root, calib_dataset=calib_dataset,
                      calib_root=calib_root, calib_size=recipe.calib_size,
                      eval_size=recipe.eval_size, batch_size=recipe.eval_batch_size,
                      workers=recipe.workers, seed=recipe.train.seed)
    train_set = task.train_set(spec, train_name, train_folder, patch=recipe.patch)
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
    hooks = [as_hook(t) for t in recipe.loss_terms(model, data.example.to(ctx.device))]
    progress = recipe.train.progress and ctx.is_main
    float_scores: dict[str, Any] = dict.fromkeys(task.score_keys)
    if eval_float and ctx.is_main:
        float_scores = task.scores(evaluate(model, data.eval, progress=progress,
                                            desc="eval float", spec=spec))
        echo(f"float {recipe.model}: {task.headline(float_scores)} ({data.protocol})")

    def scores(m):
        return task.scores(evaluate(m, data.eval, progress=False, spec=spec))

    def eval_fn(m):
        return scores(m) if ctx.is_main else {}

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
        "training_data": {"dataset": train_name, "root": None if train_folder is None
                          else str(train_folder), "images": len(train_set),
                          "labels_read": recipe.train.loss == "ce"},
        **{f"float_{k}": v for k, v in float_scores.items()},
        "train_seconds": seconds, "history": result.history, "world_size": ctx.world_size,
    }
    if ctx.is_main:
        final = result.history[-1] if result.history else {}
        keys = task.score_keys
        out.update({k: final[k] for k in keys} if all(k in final for k in keys)
                   else scores(result.model))
        for row in result.history:
            echo(f"stage {row['stage']} {row.get('bits', '')} epoch {row['epoch']}: loss "
                 f"{row['loss']:.4f}{train_acc_text(row)}"
                 + (f" {task.headline(row)}" if all(k in row for k in keys) else ""))
        if output_dir is not None:
            from ..pipeline import save_quantized, weights_record
            from ..report import write_json

            save_quantized(result.model, Path(output_dir) / "model",
                           {"model": recipe.model, "weights": weights_record(recipe.weights),
                            "random_init": recipe.weights is None, "method": recipe.method})
            write_json(Path(output_dir) / "results.json", out)
    out["model"] = result.model
    return out
