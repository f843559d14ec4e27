"""Quantization-aware training: the shared trainer, progressive schedules, recipes, DDP.

    from lowbit.qat import qat
    result = qat(model, "qil", train_loader, calib_data=calib_loader, example_inputs=x,
                 stages="5/5,4/4", output_dir="runs/qil")
"""

from .api import METHODS, QATResult, method_config, qat
from .checkpoint import load_checkpoint, save_checkpoint
from .hooks import StepContext, TrainHook
from .recipes import Recipe, load_recipe, run_recipe
from .schedule import Stage, apply_bits, parse_stages, run_stages
from .trainer import TrainConfig, Trainer, build_optimizer, lr_factor

__all__ = [
    "METHODS",
    "QATResult",
    "Recipe",
    "Stage",
    "StepContext",
    "TrainConfig",
    "TrainHook",
    "Trainer",
    "apply_bits",
    "build_optimizer",
    "load_checkpoint",
    "load_recipe",
    "lr_factor",
    "method_config",
    "parse_stages",
    "qat",
    "run_recipe",
    "run_stages",
    "save_checkpoint",
]
