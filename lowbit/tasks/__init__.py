"""Tasks: what a model's outputs mean, hence which data feeds it and which metrics score it.

A model spec names its task (``ModelSpec.task``); :func:`lowbit.evaluate` and the data glue ask
the task registered under that name. A new task is one module defining a :class:`Task` and
registering it (``register_task``), listed in ``_BUILTIN`` below so it loads on first use.
"""

from __future__ import annotations

import importlib

from .base import (
    Task,
    check_loss_task,
    get_task,
    list_tasks,
    loss_function,
    loss_names,
    register_task,
    resolve_task,
    task_of_dataset,
)

_BUILTIN = ("classification", "super_resolution")


def load_builtin() -> None:
    for name in _BUILTIN:
        importlib.import_module(f"{__name__}.{name}")


__all__ = ["Task", "check_loss_task", "get_task", "list_tasks", "load_builtin", "loss_function",
           "loss_names", "register_task", "resolve_task", "task_of_dataset"]
