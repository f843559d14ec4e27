"""SDQ recipes: one YAML file runs the search and then the retraining of the found config.

``lowbit search --recipe recipes/sdq_resnet20_cifar10_w3a4.yaml``: search per-layer bits toward
``budget``, save the config, then retrain it with the shared QAT trainer (LSQ) plus EBR and
distillation from a float teacher, evaluate, and write ``results.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from ..config import load_yaml_model
from ..evaluate import evaluate
from ..qat.api import qat
from ..qat.recipes import EBRSpec, KDSpec, RecipeBase
from .budget import Budget
from .sdq import SDQSettings, sdq_search


class SDQRecipe(RecipeBase):
    """A whole SDQ run: the common recipe fields plus the budget, the search settings, and KD /
    EBR as nested specs (on by default; ``null`` turns one off)."""

    budget: str
    search: SDQSettings = Field(default_factory=SDQSettings)
    search_train_size: int | None = Field(None, ge=1, description="search on a seeded subset")
    ebr: EBRSpec | None = Field(default_factory=EBRSpec)
    kd: KDSpec | None = Field(default_factory=KDSpec)

    def kd_spec(self) -> KDSpec | None:
        return self.kd

    def ebr_spec(self) -> EBRSpec | None:
        return self.ebr


def load_sdq_recipe(path: str | Path) -> SDQRecipe:
    recipe = load_yaml_model(SDQRecipe, path, "recipe", "; see the sdq_*.yaml files under recipes/")
    Budget.parse(recipe.budget)
    return recipe


def run_sdq_recipe(
    recipe: SDQRecipe,
    *,
    data_root: str | Path | None = None,
    output_dir: str | Path = "lowbit-sdq",
    plot: bool | None = None,
    resume: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Search, save the config under ``output_dir/search``, retrain, evaluate, write results.
    ``resume=True`` continues the search and the retraining from their checkpoints.

    The model's task decides the data, the losses and the scores, as for a QAT recipe: a
    super-resolution recipe searches and retrains on HR patches with a pixel loss (``l1`` unless
    ``search.loss`` / ``train.loss`` say otherwise) and reports PSNR-Y and SSIM; distillation,
    which compares class logits, is refused there before any loading (``kd: null``)."""
    from ..data import make_loader, subset
    from ..losses import as_hook
    from ..models import get_model, get_spec
    from ..pipeline import build_data, save_quantized, weights_record
    from ..qat.recipes import resolve_loss
    from ..report import write_json
    from ..tasks import check_loss_task, get_task

    output_dir = Path(output_dir)
    recipe = resolve_loss(recipe)
    spec = get_spec(recipe.model)
    task = get_task(spec.task)
    search = recipe.search
    if "loss" not in search.model_fields_set and search.loss not in task.losses:
        search = search.model_copy(update={"loss": task.losses[0]})
    check_loss_task(spec, search.loss)
    eval_name = (recipe.dataset or spec.default_dataset).lower()
    train_name = task.train_dataset(eval_name)
    task.check_training(spec, recipe.train.loss, train_name)
    seed = recipe.train.seed
    torch.manual_seed(seed)
    data = build_data(spec, recipe.dataset, data_root, calib_size=recipe.calib_size,
                      eval_size=recipe.eval_size, batch_size=recipe.eval_batch_size,
                      workers=recipe.workers, seed=seed)
    train_set = task.train_set(spec, train_name, data_root if train_name == eval_name else None)
    search_set = train_set
    if recipe.search_train_size and recipe.search_train_size < len(train_set):
        search_set = subset(train_set, recipe.search_train_size, seed)
    loader = lambda ds: make_loader(ds, recipe.batch_size, shuffle=True,  # noqa: E731
                                    workers=recipe.workers, seed=seed)
    model = get_model(recipe.model, recipe.weights)
    progress = recipe.train.progress
    hooks = [as_hook(t) for t in recipe.loss_terms(model, data.example)]

    def scores(m, **kw) -> dict[str, float]:
        return task.scores(evaluate(m, data.eval, spec=spec, **kw))

    float_scores = scores(model, progress=progress, desc="eval float")
    echo(f"float {recipe.model}: {task.headline(float_scores)} ({data.protocol})")

    t0 = time.perf_counter()
    found = sdq_search(model, loader(search_set), recipe.budget, data.example, search,
                       progress=progress, output_dir=output_dir / "search", resume=resume,
                       model_name=recipe.model)
    search_seconds = time.perf_counter() - t0
    files = found.save(output_dir / "search", plot=plot)
    echo(found.table())

    t0 = time.perf_counter()
    result = qat(model, "lsq", loader(train_set), calib_data=data.calib,
                 example_inputs=data.example, config=found.config, train=recipe.train,
                 hooks=hooks, output_dir=output_dir / "qat", model_name=recipe.model, resume=resume,
                 eval_fn=lambda m: scores(m, progress=False))
    train_seconds = time.perf_counter() - t0
    final = [r for r in result.history if all(k in r for k in task.score_keys)]
    final_scores = ({k: final[-1][k] for k in task.score_keys} if final
                    else scores(result.model, progress=False))
    echo(f"SDQ {found.budget.describe(found.achieved)}: {task.headline(final_scores)} "
         f"(float {task.headline(float_scores)})")
    out = {
        "recipe": recipe.model_dump(mode="json"), "protocol": data.protocol,
        **{f"float_{k}": v for k, v in float_scores.items()}, **final_scores,
        "search": found.to_dict(), "search_seconds": search_seconds,
        "train_seconds": train_seconds, "history": result.history,
        "config": str(files["config"]),
    }
    save_quantized(result.model, output_dir / "model",
                   {"model": recipe.model, "weights": weights_record(recipe.weights),
                    "random_init": recipe.weights is None, "method": "sdq"})
    write_json(output_dir / "results.json", out)
    return out
