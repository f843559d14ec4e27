"""Strategy mixture: K candidate quantizers of one tensor at one bit-width, mixed by a softmax.

DQSS (Li, Yan, Chen, 2024) lets every layer choose *which* quantizer it uses. During the search
a tensor's quantized value is ``sum_i p_i Q_i(x)`` with ``p = softmax(logits / T)``: the
architecture parameters are the ``logits`` (DQSS's alpha for weights, beta for activations),
``T`` the temperature. Each candidate keeps its own parameters (an LSQ step, a QIL interval, a
PACT clip) and trains with them. A quantized layer whose weight and input quantizers are both
mixtures runs *one* convolution on ``sum_i a_i Q_i(W)`` and ``sum_j b_j Q_j(x)``, which by
bilinearity equals the DARTS sum ``sum_ij a_i b_j conv(Q_j(x), Q_i(W))`` of all ``K_w * K_a``
pairs: the efficient convolution needs no layer of its own.

A *strategy* is a candidate described by name: ``minmax``, ``percentile`` or ``mse`` (the uniform
quantizer calibrated by that observer), a registered quantizer kind (``lsq``, ``qil``, ``pot``,
``pact``, ...; calibrated by the config's observer), or ``kind:observer`` (``lsq:percentile``).
:func:`strategy_fields` turns a name into the :class:`~lowbit.config.QuantizerSpec` fields that
select it, which is what the discrete choice writes into a config rule.

Candidates must agree on bits, signedness and per-channel layout: the mixture is one tensor's
quantizer, and the discrete choice replaces it by one of them in the same slot. The mixture is
not a config kind (it has no single grid: no scale, no integer form); a search builds it with
:func:`mixture_like` and ends it with :meth:`MixtureQuantizer.chosen`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .autograd import flat_dot
from .base import Quantizer, check_bits
from .observers import OBSERVERS
from .registry import QUANTIZERS, quantizer_class

# the observer-only strategies: the uniform quantizer with that range estimate
OBSERVER_STRATEGIES = ("minmax", "percentile", "mse")


def strategy_fields(name: str, observer: str) -> dict[str, Any]:
    """The quantizer-spec fields (``kind``, ``observer``) of strategy ``name``; ``observer`` is
    the one a kind-only name is calibrated with."""
    kind, _, obs = name.partition(":")
    if not obs and kind in OBSERVER_STRATEGIES:
        kind, obs = "uniform", name
    obs = obs or observer
    if kind not in QUANTIZERS or kind in ("base", "sdq"):
        usable = sorted(k for k in QUANTIZERS if k not in ("base", "sdq"))
        raise ConfigError(
            f"unknown quantization strategy {name!r}; use {', '.join(OBSERVER_STRATEGIES)} "
            f"(uniform, calibrated by that observer), a quantizer kind ({', '.join(usable)}) "
            "or KIND:OBSERVER such as lsq:percentile"
        )
    if obs not in OBSERVERS:
        raise ConfigError(f"strategy {name!r}: unknown observer {obs!r}; choose one of "
                          f"{sorted(OBSERVERS)}")
    return {"kind": kind, "observer": obs}


def candidate_like(q: Quantizer, name: str, observer: str,
                   options: dict[str, Any] | None = None) -> Quantizer:
    """A quantizer of strategy ``name`` for the tensor ``q`` quantizes (same bits, sign, layout)."""
    fields = strategy_fields(name, observer)
    cls = quantizer_class(fields["kind"])
    try:
        check_bits(q.bits, q.signed, cls)
    except ConfigError as e:
        raise ConfigError(f"candidate {name!r} cannot represent {q.bits} bits here: {e}") from None
    obs_kwargs = {}
    if fields["observer"] == "percentile":
        obs_kwargs["percentile"] = getattr(q.observer, "percentile", 99.99)
    try:
        c = cls(bits=q.bits, signed=q.signed, symmetric=q.symmetric, per_channel=q.per_channel,
                ch_axis=q.ch_axis, narrow_range=q.narrow_range, observer=fields["observer"],
                observer_kwargs=obs_kwargs, **(options or {}))
    except TypeError as e:
        raise ConfigError(f"candidate {name!r} rejected its options: {e}") from None
    c.name, c.static = q.name, q.static
    return c


def mixture_like(q: Quantizer, names: Sequence[str], observer: str,
                 options: dict[str, dict[str, Any]] | None = None,
                 temperature: float = 1.0) -> MixtureQuantizer:
    """A mixture of the strategies ``names`` for the tensor ``q`` quantizes (``options``: extra
    keyword arguments per strategy name)."""
    if not names:
        raise ConfigError("a strategy mixture needs at least one candidate; give e.g. "
                          "['mse', 'lsq', 'pact']")
    cands = [candidate_like(q, n, observer, (options or {}).get(n)) for n in names]
    mix = MixtureQuantizer(cands, names, temperature=temperature)
    mix.name, mix.static = q.name, q.static
    return mix.to(_device(q))


class MixtureQuantizer(Quantizer):
    """``sum_i softmax(logits / T)_i * candidates[i](x)``; see the module docstring.

    Calibration observes with every candidate (``lowbit.calibrate`` finishes each, since they are
    quantizers of the model too); :attr:`calibrated` is theirs. ``choice`` (an index) makes the
    forward pass that candidate alone, exactly: the discrete result of a search.
    """

    kind = "mixture"
    min_signed_bits = 1  # the candidates check their own limits
    param_names = ()

    def __init__(self, candidates: Sequence[Quantizer], names: Sequence[str] | None = None,
                 temperature: float = 1.0):
        cands = list(candidates)
        if not cands:
            raise ConfigError("a strategy mixture needs at least one candidate quantizer")
        names = list(names) if names is not None else [c.kind for c in cands]
        if len(names) != len(cands) or len(set(names)) != len(names):
            raise ConfigError(f"a strategy mixture needs one distinct name per candidate, got "
                              f"{names} for {len(cands)} candidates")
        first = cands[0]
        for n, c in zip(names, cands, strict=True):
            if not isinstance(c, Quantizer):
                raise ConfigError(f"candidate {n!r} is a {type(c).__name__}, not a Quantizer")
            for attr, what in (("bits", "bit-width"), ("signed", "signedness"),
                               ("per_channel", "per-channel layout")):
                if getattr(c, attr) != getattr(first, attr):
                    raise ConfigError(
                        f"candidates disagree on {what}: {names[0]!r} has {attr}="
                        f"{getattr(first, attr)}, {n!r} has {getattr(c, attr)}; give every "
                        "candidate of one tensor the same bits, signed and per_channel")
            if c.per_channel and c.ch_axis != first.ch_axis:
                raise ConfigError(f"candidates disagree on the per-channel axis: {names[0]!r} "
                                  f"uses {first.ch_axis}, {n!r} uses {c.ch_axis}")
        super().__init__(bits=first.bits, signed=first.signed, symmetric=first.symmetric,
                         per_channel=first.per_channel, ch_axis=first.ch_axis,
                         narrow_range=first.narrow_range)
        self.candidates = nn.ModuleList(cands)
        self.names = names
        self.logits = nn.Parameter(torch.zeros(len(cands), device=_device(first)))
        self.temperature = self._check_temperature(temperature)
        self.choice: int | None = None

    @staticmethod
    def _check_temperature(t: float) -> float:
        if not t > 0:
            raise ConfigError(f"the mixture's softmax temperature must be positive, got {t}")
        return float(t)

    def set_temperature(self, t: float) -> None:
        self.temperature = self._check_temperature(t)

    # signedness and calibration are the candidates' (they decide the sign from the data)
    @property
    def signed(self):
        cands = self._modules.get("candidates")
        return self._signed if cands is None else cands[0].signed

    @signed.setter
    def signed(self, value) -> None:
        self._signed = value

    @property
    def calibrated(self) -> bool:
        cands = self._modules.get("candidates")
        return cands is not None and all(c.calibrated for c in cands)

    @calibrated.setter
    def calibrated(self, value) -> None:
        """Derived from the candidates; the base class's assignment is ignored."""

    def set_bits(self, bits: int) -> None:
        for c in self.candidates:
            c.set_bits(bits)
        self._bits = bits

    def extra_repr(self) -> str:
        return (f"candidates={self.names}, bits={self.bits}, temperature={self.temperature:g}, "
                f"choice={self.choice}, mode={self.mode.value}")

    def probabilities(self) -> torch.Tensor:
        """The mixing weights ``softmax(logits / T)`` (differentiable)."""
        return torch.softmax(self.logits / self.temperature, 0)

    def argmax(self) -> int:
        """The discrete choice: the largest logit (the first on a tie; one sync)."""
        return int(torch.argmax(self.logits.detach()))

    def chosen(self) -> Quantizer:
        """The candidate of :attr:`choice` (else of :meth:`argmax`), to put in the mixture's slot."""
        return self.candidates[self.choice if self.choice is not None else self.argmax()]

    def observe(self, x: torch.Tensor) -> None:
        for c in self.candidates:
            c.observe(x)

    def finish_calibration(self) -> None:
        """Nothing of its own: each candidate is finished as a quantizer of the model. Alone,
        finish the candidates (``for c in mix.candidates: c.finish_calibration()``)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        if self.choice is not None:
            return self.candidates[self.choice].quantize(x)
        outs = [c.quantize(x) for c in self.candidates]
        return _WeightedSum.apply(self.probabilities(), *outs)

    def scale_zero_point(self):
        raise ConfigError(f"{self._where()} is a strategy mixture: it has no single scale; take "
                          "the discrete choice first (MixtureQuantizer.chosen())")

    def params(self) -> dict[str, torch.Tensor]:
        return self.scale_zero_point()

    def load_params(self, params) -> None:
        self.scale_zero_point()

    def integer_form(self, x: torch.Tensor):
        return self.scale_zero_point()


class _WeightedSum(torch.autograd.Function):
    """``sum_i p[i] * ys[i]`` accumulated in place, with ``dL/dp[i] = <grad, ys[i]>`` as one
    dot product each: the autograd chain of ``K`` products and ``K - 1`` sums allocated a
    tensor per node and a full product per ``p[i]`` gradient, a fifth of a mixed activation's
    cost at CIFAR sizes."""

    @staticmethod
    def forward(ctx, p, *ys):
        out = ys[0] * p[0]
        for i in range(1, len(ys)):
            out.addcmul_(ys[i], p[i])
        ctx.save_for_backward(p, *ys)
        return out

    @staticmethod
    def backward(ctx, grad):
        p, *ys = ctx.saved_tensors
        gp = None
        if ctx.needs_input_grad[0]:
            gp = torch.stack([flat_dot(grad, y) for y in ys])
        gys = [grad * p[i] if ctx.needs_input_grad[i + 1] else None for i in range(len(ys))]
        return (gp, *gys)


def _device(q: Quantizer) -> torch.device:
    t = next(iter(q.parameters()), None)
    if t is None:
        t = next(iter(q.buffers()), torch.zeros(()))
    return t.device
