"""Baseline PTQ: prepare, then calibrate ranges with min-max, percentile or MSE observers."""

from __future__ import annotations

from ..prepare import calibrate, prepare
from .registry import register_ptq


@register_ptq("minmax", "percentile", "mse")
def calibration_ptq(
    model, config, calib_data, example_inputs, *, method: str, num_batches=None,
    progress: bool = True,
):
    """The observer named by ``method`` sets every weight and activation range."""
    update = {}
    if config.weight is not None:
        update["weight"] = config.weight.model_copy(update={"observer": method})
    if config.act is not None:
        update["act"] = config.act.model_copy(update={"observer": method})
    config = config.model_copy(update=update)
    qmodel = prepare(model, config, example_inputs)
    return calibrate(qmodel, calib_data, num_batches=num_batches, progress=progress)
