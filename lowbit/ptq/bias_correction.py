"""Empirical bias correction: re-centre every quantized layer's output on the float model's.

Low-bit weights shift the mean of a layer's output channel by channel: the rounding errors of
a channel's weights do not cancel when it has few of them (depthwise and 1x1 projection convs).
With BatchNorm folded nothing re-centres the output, and the shifts add up through the network
(MobileNetV2 at W4 falls to chance from this alone). Following the empirical variant of Nagel
et al. (ICCV 2019), the per-channel mean of each quantized layer's output over calibration
images is matched to the float model's by changing the layer's bias. The correction is applied
in network order within one forward pass, so each layer is corrected for the inputs that the
corrections before it produce; the new bias is an ordinary float bias, exported like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CalibrationError
from ..prepare import float_mode, quant_layers

BC_IMAGES = 128  # images in the single correcting pass; the means of N*H*W values are stable


def _weight_quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in quant_layers(model) if m.weight_quant is not None]


def _channel_mean(mod: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Mean per output channel: dim 1 for convolutions, the last dim for linear layers."""
    if isinstance(mod, nn.Linear):
        return out.reshape(-1, out.shape[-1]).float().mean(0)
    return out.float().mean(dim=[0, *range(2, out.dim())])


def _as_output(mod: nn.Module, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``delta`` shaped to broadcast over ``out``'s channel dimension."""
    if isinstance(mod, nn.Linear):
        return delta
    return delta.view(1, -1, *([1] * (out.dim() - 2)))


@torch.no_grad()
def _run_with_hooks(qmodel: nn.Module, x: torch.Tensor, layers, hook) -> None:
    """One eval-mode pass over the first BC_IMAGES of ``x`` with ``hook(name)`` on ``layers``."""
    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    was = qmodel.training
    qmodel.eval()
    try:
        qmodel(x[:BC_IMAGES])
    finally:
        qmodel.train(was)
        for h in handles:
            h.remove()


def float_output_means(qmodel: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel output means of every weight-quantized layer with quantizers off.

    Take them before anything writes quantized weights into the model (reconstruction does),
    while float mode still is the float model.
    """
    means: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, inputs, out):
            means[name] = _channel_mean(mod, out)
        return record

    with float_mode(qmodel):
        _run_with_hooks(qmodel, x, _weight_quant_layers(qmodel), hook)
    return means


def correct_bias(qmodel: nn.Module, x: torch.Tensor,
                 float_means: dict[str, torch.Tensor]) -> dict:
    """Shift each quantized layer's bias (in place) so its output mean matches ``float_means``.

    Layers without a bias are left alone and listed. Returns the mean absolute shift per
    layer and the skipped layers.
    """
    layers = [(n, m) for n, m in _weight_quant_layers(qmodel) if n in float_means]
    shifts: dict[str, torch.Tensor] = {}
    skipped: list[str] = []

    def hook(name):
        def shift(mod, inputs, out):
            if mod.bias is None:
                skipped.append(name)
                return out
            delta = float_means[name].to(out.device) - _channel_mean(mod, out)
            if not bool(torch.isfinite(delta).all()):
                raise CalibrationError(
                    f"bias correction of layer {name!r} produced NaN/Inf: its quantized output "
                    "is not finite on the calibration images; check the bit widths and ranges"
                )
            mod.bias.add_(delta.to(mod.bias.dtype))
            shifts[name] = delta.abs().mean()
            return out + _as_output(mod, delta, out).to(out.dtype)
        return shift

    _run_with_hooks(qmodel, x, layers, hook)
    values = torch.stack(list(shifts.values())).tolist() if shifts else []
    return {"layers": len(shifts), "skipped_no_bias": skipped,
            "mean_abs_shift": dict(zip(shifts, values, strict=True))}
