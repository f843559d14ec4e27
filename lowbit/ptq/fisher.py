"""Output sensitivities of each reconstruction unit: where an error reaches the prediction.

The plain reconstruction loss weighs every element of a unit's output alike, but an error
in one channel or position moves the network's prediction far more than the same error in
another. BRECQ (Li et al., ICLR 2021) weighs each element's squared error by the squared
gradient of the task loss with respect to it (a diagonal Fisher approximation). lowbit takes
that gradient once, on the float model, with the float model's own top class as the label
(no labels needed), in one forward and backward pass over the calibration set for all units
at once; each unit's gradients are kept in bfloat16 until its turn and then freed.

The weight of an element is ``(1 + |g| / rms(g))**2``, normalised to mean 1 over the unit:
the plain squared error plus the sensitive elements' emphasis, as in BRECQ's ``|g| + 1``,
so an image the float model is sure of (a near-zero gradient) still counts, and the loss
keeps the plain error's scale, against which the rounding and BN weights are set.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

log = logging.getLogger("lowbit")


class Sensitivity:
    """One unit's scaled gradient magnitudes ``|g| / rms(g)`` (bfloat16) and their mean."""

    def __init__(self, r: torch.Tensor, mean_r: float):
        self.r = r
        self.norm = 2.0 + 2.0 * mean_r  # mean of (1 + r)^2, as mean(r^2) is 1

    def weights(self, idx: torch.Tensor | slice) -> torch.Tensor:
        return (1.0 + self.r[idx].float()).pow_(2).div_(self.norm)


def output_sensitivities(
    model: nn.Module, units: list[str], inputs: torch.Tensor, chunk: int = 64,
) -> dict[str, Sensitivity]:
    """Per unit, the sensitivity of the float ``model``'s prediction to each output element.

    ``model`` is the float reference (BN folded, quantizers off); ``inputs`` the whole
    calibration set. Needs a classifier (logits ``[N, classes]``) whose units each run once
    per forward pass.
    """
    n = inputs.shape[0]
    mods = {name: model.get_submodule(name) for name in units}
    outs: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(mod, args, out):
            outs.setdefault(name, []).append(out)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in mods.items()]
    grads: dict[str, torch.Tensor] = {}
    sq = dict.fromkeys(units, 0.0)
    sa = dict.fromkeys(units, 0.0)
    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for start in range(0, n, chunk):
            s = slice(start, min(start + chunk, n))
            outs.clear()
            with torch.enable_grad():
                x = inputs[s].detach().requires_grad_(True)
                logits = model(x)
                if not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
                    raise ConfigError(
                        "objective='fisher' needs a classifier whose output is logits [N, "
                        f"classes]; this model returns {type(logits).__name__} "
                        f"{tuple(getattr(logits, 'shape', ()))}; use objective='mse'")
                twice = [u for u, o in outs.items() if len(o) != 1]
                if twice:
                    raise ConfigError(
                        f"objective='fisher' needs every unit called once per forward pass; "
                        f"{twice[:3]} ran more often; use objective='mse'")
                names = [u for u in units if u in outs and isinstance(outs[u][0], torch.Tensor)
                         and outs[u][0].requires_grad]
                loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
                gs = torch.autograd.grad(loss, [outs[u][0] for u in names], allow_unused=True)
            for u, g in zip(names, gs, strict=True):
                if g is None:
                    continue
                if u not in grads:
                    grads[u] = torch.empty((n, *g.shape[1:]), dtype=torch.bfloat16,
                                           device=g.device)
                g = g.abs()
                grads[u][s] = g
                sq[u] += float(g.double().pow(2).sum())
                sa[u] += float(g.double().sum())
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        outs.clear()
    result = {}
    for u, g in grads.items():
        rms = (sq[u] / g.numel()) ** 0.5
        if not rms > 0:
            log.info("fisher: unit %s has no gradient; plain squared error there", u)
            continue
        g.div_(rms)
        result[u] = Sensitivity(g, sa[u] / g.numel() / rms)
    return result
