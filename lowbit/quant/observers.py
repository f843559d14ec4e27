"""Range estimation from data: min-max, percentile and MSE-optimal clipping.

An observer only collects statistics and turns them into a clipping range ``(lo, hi)``;
turning a range into a scale and zero-point is the quantizer's business
(:func:`lowbit.quant.base.range_to_params`), so every quantizer can reuse every observer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str):
    """Class decorator adding an observer under ``name`` (used by configs)."""

    def wrap(cls):
        OBSERVERS[name] = cls
        cls.method = name
        return cls

    return wrap


def build_observer(name: str, **kwargs) -> Observer:
    if name not in OBSERVERS:
        raise ConfigError(
            f"unknown range observer {name!r}; choose one of {sorted(OBSERVERS)}"
        )
    return OBSERVERS[name](**kwargs)


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as [C, N] for per-channel statistics (C = 1 per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


class Observer(nn.Module):
    """Collects statistics batch by batch; :meth:`compute_range` gives per-channel (lo, hi)."""

    method = "base"

    def __init__(self, axis: int | None = None):
        super().__init__()
        self.axis = axis
        self.batches = 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def reset(self) -> None:
        self.batches = 0
        self.lo = self.hi = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = _channels_first(x.detach().float(), self.axis)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            if lo.shape != self.lo.shape:
                raise ConfigError(
                    f"per-channel observer saw {lo.numel()} channels after {self.lo.numel()}; "
                    "channel count along the quantization axis must not change between batches"
                )
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self._update(flat)
        self.batches += 1

    def _update(self, flat: torch.Tensor) -> None:
        """Extra statistics for subclasses; ``flat`` is [C, N]."""

    def compute_range(self, qrange) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel clipping range; ``qrange`` maps a range to fake-quantized values (MSE)."""
        return self.lo, self.hi


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum: no clipping, largest rounding error."""


@register_observer("percentile")
class PercentileObserver(Observer):
    """Average over batches of the per-batch low/high percentiles (clips rare outliers)."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99):
        super().__init__(axis)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.sum_lo: torch.Tensor | None = None
        self.sum_hi: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.sum_lo = self.sum_hi = None

    def _update(self, flat: torch.Tensor) -> None:
        n = flat.shape[1]
        k_hi = max(1, min(n, round(n * self.percentile / 100.0)))
        k_lo = max(1, min(n, n + 1 - k_hi))
        hi = flat.kthvalue(k_hi, dim=1).values
        lo = flat.kthvalue(k_lo, dim=1).values
        self.sum_lo = lo if self.sum_lo is None else self.sum_lo + lo
        self.sum_hi = hi if self.sum_hi is None else self.sum_hi + hi

    def compute_range(self, qrange):
        return self.sum_lo / self.batches, self.sum_hi / self.batches


@register_observer("mse")
class MSEObserver(Observer):
    """Clipping range minimising the mean squared quantization error on the observed data.

    Keeps a bounded, seeded random sample of the values per channel and grid-searches a
    shrink factor of the min-max range, vectorised over channels. Per-channel activations
    (hundreds of channels of 100k+ values each) keep ``max_samples / channels`` values per
    channel, at least ``min_per_channel``: the full per-tensor budget for every channel would
    cost gigabytes and minutes, for a 4-bit range that needs far fewer values.
    """

    def __init__(self, axis: int | None = None, max_samples: int = 1 << 18, grid: int = 80,
                 min_per_channel: int = 1 << 14):
        super().__init__(axis)
        self.max_samples = max_samples
        self.min_per_channel = min_per_channel
        self.grid = grid
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def reset(self) -> None:
        super().reset()
        self.samples = []
        self._gen = torch.Generator().manual_seed(0)  # the same sample on every run

    def _update(self, flat: torch.Tensor) -> None:
        channels, n = flat.shape
        if channels == 1:
            budget = self.max_samples
            per_batch = budget // 16
        else:
            # a tensor that fits (a weight) is kept whole; activations: 1/16 of the budget
            budget = max(self.min_per_channel, self.max_samples // channels)
            per_batch = n if n <= budget else budget // 16
        if n <= per_batch:
            self.samples.append(flat.clone())
        else:
            # A random sample, not every k-th value: a stride that is a multiple of the image
            # width (1568 = 14 x 112 on a 64 x 32 x 112 x 112 map) would read one pixel column.
            idx = torch.randint(n, (per_batch,), generator=self._gen).to(flat.device)
            self.samples.append(flat[:, idx])
        total = sum(s.shape[1] for s in self.samples)
        if total > budget:
            merged = torch.cat(self.samples, dim=1)
            self.samples = [merged[:, :: max(2, merged.shape[1] // budget)]]

    @torch.no_grad()
    def compute_range(self, qrange):
        data = torch.cat(self.samples, dim=1)
        lo, hi = self.lo, self.hi
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.grid):
            alpha = 1.0 - i / (self.grid + 1) * 0.99
            cand_lo, cand_hi = lo * alpha, hi * alpha
            err = (qrange(data, cand_lo, cand_hi) - data).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, cand_lo, best_lo)
            best_hi = torch.where(better, cand_hi, best_hi)
        return best_lo, best_hi
