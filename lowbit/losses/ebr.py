"""Entropy-aware bin regularization (EBR), the retraining regularizer of SDQ.

Quantization maps each weight to a bin (an integer code); the bin centre is the value it is
replaced by. EBR pulls the weights of each bin toward their centre and keeps the bins used
evenly, because evenly used bins carry the most information per code:

* within-bin term: over the occupied bins, ``(mean_k - c_k)^2 + var_k`` of the weights in bin
  ``k`` in units of the layer's mean step (so layers of any scale weigh alike). It is zero
  exactly when every weight sits on its bin centre.
* entropy term: the entropy of the bins' occupancy, with each weight softly assigned to the
  bins by ``softmax(-(v - c_k)^2 / tau)`` so it has a gradient; largest (``log K``) when the K
  bins are used evenly. The loss uses ``1 - H / log K``.

The loss term is ``weight * (within + entropy_weight * (1 - H / log K))``, averaged over the
quantized layers whose weight quantizer is calibrated and in ``quantize`` mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.layers import QuantLayerMixin
from ..quant.base import Quantizer, QuantMode


def bin_codes(w: torch.Tensor, quantizer: Quantizer) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Code-unit weights ``v = w / s + zp`` and the distance of each weight to its bin centre,
    ``e = (w - (c - zp) * s) / mean(s)``, in units of the layer's mean step; plus the code range.

    Measuring in the layer's mean step rather than each channel's own keeps the gradient bounded:
    a channel whose step is tiny (1e-7 after BatchNorm folding happens) would otherwise get a
    gradient a million times larger than its neighbours and blow its weights up. ``v`` carries
    the same ``1 / mean(s)`` gradient (for the entropy term).
    """
    scale, zp = quantizer.scale_zero_point()
    qmin, qmax = quantizer.qrange
    s, z = quantizer.broadcast(scale, w), quantizer.broadcast(zp, w)
    s_ref = scale.mean()
    if quantizer.binary:
        # codes -1/+1 have no 0 bin: count them as bins 0/1 of the code units (w / s + 1) / 2
        pos = w.detach() >= 0
        v = ((w / s).detach() + 1).mul_(0.5)
        v = torch.where(pos, v.clamp(min=0.5001), v.clamp(max=0.4999))
        e = (w - torch.where(pos, s, -s)) / s_ref
        v = v + (w / (2 * s_ref) - (w / (2 * s_ref)).detach())
        return v, e, 0, 1
    v = (w / s).detach() + z
    centre = bin_index(v, qmin, qmax).to(w.dtype).reshape(w.shape) + qmin
    e = (w - (centre - z) * s) / s_ref
    v = v + (w / s_ref - (w / s_ref).detach())
    return v, e, qmin, qmax


def bin_index(v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Flat bin index (0-based) of each code-unit value: nearest code, clipped to the range."""
    codes = torch.nan_to_num(v.detach().reshape(-1), nan=float(qmin))  # NaN: a NaN loss, no crash
    return torch.round(codes).clamp_(qmin, qmax).to(torch.long) - qmin


def within_bin(
    v: torch.Tensor, qmin: int, qmax: int, e: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over occupied bins of ``mean_k(e)^2 + var_k(e)``, bins chosen by the code-unit ``v``
    and ``e`` the distance to the bin centre (default ``v - c``).

    With one step size this is ``(mean_k - c_k)^2 + var_k`` of the weights in bin ``k``.
    """
    idx = bin_index(v, qmin, qmax)
    v = v.reshape(-1)
    e = v - (idx + qmin).to(v.dtype) if e is None else e.reshape(-1)
    k = qmax - qmin + 1
    counts = torch.bincount(idx, minlength=k).to(e.dtype)
    occupied = counts > 0
    denom = counts.clamp_min(1)
    mean = torch.zeros(k, dtype=e.dtype, device=e.device).index_add(0, idx, e) / denom
    dev = e - mean[idx]
    var = torch.zeros(k, dtype=e.dtype, device=e.device).index_add(0, idx, dev * dev) / denom
    per_bin = mean.pow(2) + var
    return (per_bin * occupied).sum() / occupied.sum()


def bin_entropy(v: torch.Tensor, qmin: int, qmax: int, tau: float = 0.1) -> torch.Tensor:
    """Entropy (nats) of the soft bin occupancy; ``v`` in code units."""
    v = v.reshape(-1, 1)
    centres = torch.arange(qmin, qmax + 1, dtype=v.dtype, device=v.device)
    assign = torch.softmax(-(v.clamp(qmin - 0.5, qmax + 0.5) - centres).pow(2) / tau, dim=1)
    p = assign.mean(dim=0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


class EntropyBinRegularizer(nn.Module):
    """EBR as a loss plug-in: ``ebr(model, inputs, outputs, targets) -> scalar``.

    ``weight`` scales the whole term, ``entropy_weight`` the evenness part, ``tau`` is the
    temperature of the soft assignment used for the entropy (in squared code units).
    """

    name = "ebr"

    def __init__(self, weight: float = 1e-2, entropy_weight: float = 0.1, tau: float = 0.1):
        super().__init__()
        if weight < 0 or entropy_weight < 0:
            raise ConfigError(
                f"EBR weights must be >= 0, got weight={weight}, entropy_weight={entropy_weight}"
            )
        if tau <= 0:
            raise ConfigError(f"EBR tau must be positive, got {tau}")
        self.weight = weight
        self.entropy_weight = entropy_weight
        self.tau = tau

    def extra_repr(self) -> str:
        return f"weight={self.weight}, entropy_weight={self.entropy_weight}, tau={self.tau}"

    def layer_terms(self, layer: QuantLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
        """(within-bin term, normalised entropy deficit ``1 - H / log K``) of one layer."""
        v, e, qmin, qmax = bin_codes(layer.weight, layer.weight_quant)
        within = within_bin(v, qmin, qmax, e)
        k = qmax - qmin + 1
        deficit = 1 - bin_entropy(v, qmin, qmax, self.tau) / math.log(k) if k > 1 else within * 0
        return within, deficit

    def forward(self, model: nn.Module, inputs=None, outputs=None, targets=None) -> torch.Tensor:
        terms = []
        for mod in model.modules():
            wq = getattr(mod, "weight_quant", None)
            if (isinstance(mod, QuantLayerMixin) and isinstance(wq, Quantizer) and wq.calibrated
                    and wq.mode is QuantMode.QUANTIZE):
                within, deficit = self.layer_terms(mod)
                terms.append(within + self.entropy_weight * deficit)
        if not terms:
            raise ConfigError(
                "EBR found no quantized weights: prepare and calibrate the model first, and keep "
                "its quantizers in 'quantize' mode"
            )
        return self.weight * torch.stack(terms).mean()
