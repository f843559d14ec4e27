"""Baseline PTQ: prepare, then calibrate ranges with min-max, percentile or MSE observers."""

from __future__ import annotations

from ..prepare import calibrate, prepare
from ..utils import model_device
from .registry import register_ptq


@register_ptq("minmax", "percentile", "mse")
def calibration_ptq(
    model, config, calib_data, example_inputs, *, method: str, num_batches=None,
    progress: bool = True, bias_correction: bool = False,
):
    """The observer named by ``method`` sets every weight and activation range;
    ``bias_correction`` then re-centres each layer's output on the float model's."""
    update = {}
    if config.weight is not None:
        update["weight"] = config.weight.model_copy(update={"observer": method})
    if config.act is not None:
        update["act"] = config.act.model_copy(update={"observer": method})
    config = config.model_copy(update=update)
    qmodel = prepare(model, config, example_inputs)
    qmodel = calibrate(qmodel, calib_data, num_batches=num_batches, progress=progress)
    if bias_correction:
        from .bias_correction import correct_bias, float_output_means
        from .rapq import gather_inputs

        x = gather_inputs(calib_data, num_batches).to(model_device(qmodel))
        qmodel.lowbit_bias_correction = correct_bias(qmodel, x, float_output_means(qmodel, x))
    return qmodel
