"""Baseline PTQ: prepare, then calibrate ranges with min-max, percentile or MSE observers."""

from __future__ import annotations

from ..prepare import calibrate, prepare
from ..utils import model_device
from .configs import MinMaxConfig, MseConfig, PercentileConfig
from .registry import register_ptq


def _range_ptq(model, config, calib_data, example_inputs, mc, *, progress: bool = True):
    """The observer named by ``mc.method`` sets every weight and activation range;
    ``bias_correction`` then re-centres each layer's output on the float model's."""
    spec = {"observer": mc.method}
    if getattr(mc, "percentile", None) is not None:
        spec["percentile"] = mc.percentile
    update = {side: getattr(config, side).model_copy(update=spec)
              for side in ("weight", "act") if getattr(config, side) is not None}
    config = config.model_copy(update=update)
    qmodel = prepare(model, config, example_inputs)
    qmodel = calibrate(qmodel, calib_data, num_batches=mc.num_batches, progress=progress)
    if mc.bias_correction:
        from .bias_correction import correct_bias, float_output_means
        from .rapq import gather_inputs

        x = gather_inputs(calib_data, mc.num_batches).to(model_device(qmodel))
        qmodel.lowbit_bias_correction = correct_bias(qmodel, x, float_output_means(qmodel, x))
    return qmodel


for _cls in (MinMaxConfig, MseConfig, PercentileConfig):
    register_ptq(_cls)(_range_ptq)
