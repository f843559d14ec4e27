"""Per-layer cost of a (prepared or float) model, found by hooking every call in one forward pass.

Definitions (per input sample; the batch is the first dimension of the first example tensor):

* MACs: summed over every call of a layer (a layer called twice costs twice); the per-call
  rules for Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and MultiheadAttention are in
  :mod:`lowbit.cost.counts`;
* BitOPs: ``MACs * w_bits * a_bits`` (float sides count 32 bits; a layer left float counts
  32 x 32);
* weight memory: ``weight elements * w_bits + bias elements * 32`` bits, counted once however
  often the layer is called;
* activation memory: the layer's largest input over its calls, times ``a_bits`` bits.

A MultiheadAttention gives three rows: ``<name>.in_proj`` and ``<name>.out_proj`` (its
projections, float) and ``<name>.attention`` (the ``Q K^T`` and ``softmax @ V`` matmuls, no
weights). Every other parameter (an unfolded BatchNorm, a layer the example never calls, an
embedding) adds to the model size at 32 bits and no MACs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConfigError
from ..graph import run_example
from ..nn.layers import QuantLayerMixin
from . import counts

FLOAT_BITS = 32


@dataclass
class LayerCost:
    name: str
    type: str
    w_bits: int
    a_bits: int
    params: int
    macs: int
    bitops: int
    weight_bits: int
    act_elems: int
    act_bits: int
    calls: int = 1


@dataclass
class CostReport:
    layers: list[LayerCost] = field(default_factory=list)
    other_params: int = 0

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def bitops(self) -> int:
        return sum(r.bitops for r in self.layers)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers) + self.other_params

    @property
    def weight_bits(self) -> int:
        """Model size in bits: compute layers at their bits, every other parameter at 32."""
        return sum(r.weight_bits for r in self.layers) + self.other_params * FLOAT_BITS

    @property
    def size_bytes(self) -> float:
        return self.weight_bits / 8

    @property
    def max_act_bits(self) -> int:
        """Largest single layer input (the activation-memory figure Sony MCT budgets)."""
        return max((r.act_bits for r in self.layers), default=0)

    @property
    def avg_weight_bits(self) -> float:
        """Weight bits averaged over weight elements (the 'average bits' of mixed precision)."""
        n = sum(r.params for r in self.layers)
        return sum(r.params * r.w_bits for r in self.layers) / max(n, 1)

    def totals(self) -> dict[str, float]:
        return {
            "params": self.params, "macs": self.macs, "bitops": self.bitops,
            "weight_bits": self.weight_bits, "size_bytes": self.size_bytes,
            "avg_weight_bits": self.avg_weight_bits, "max_act_bits": self.max_act_bits,
        }

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "totals": self.totals()}

    def table(self) -> str:
        """Plain-text layer table (name, type, bits, params, MACs, BitOPs)."""
        head = f"{'layer':<32} {'type':<8} {'W':>3} {'A':>3} {'params':>10} {'MACs':>12} {'BitOPs':>15}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name:<32} {r.type:<8} {r.w_bits:>3} {r.a_bits:>3} {r.params:>10,} "
                f"{r.macs:>12,} {r.bitops:>15,}"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{'total':<32} {'':<8} {'':>3} {'':>3} {self.params:>10,} {self.macs:>12,} "
            f"{self.bitops:>15,}"
        )
        rows.append(
            f"size {self.size_bytes / 1024:,.1f} KiB, average weight bits "
            f"{self.avg_weight_bits:.2f}, GBitOPs {self.bitops / 1e9:.3f}"
        )
        return "\n".join(rows)


def _bits(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, QuantLayerMixin):
        return mod.w_bits, mod.a_bits
    return FLOAT_BITS, FLOAT_BITS


def _numel(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() for t in tensors if t is not None)


@dataclass
class _Tally:
    """What the hooks gather for one row: totals over all calls, before dividing by the batch."""

    type: str
    w_bits: int
    a_bits: int
    weights: int
    biases: int
    macs: int = 0
    act: int = 0
    calls: int = 0

    def add(self, macs: int, act: int) -> None:
        self.macs += macs
        self.act = max(self.act, act)
        self.calls += 1

    def row(self, name: str, batch: int) -> LayerCost:
        macs, act = self.macs // batch, self.act // batch
        return LayerCost(
            name=name, type=self.type, w_bits=self.w_bits, a_bits=self.a_bits,
            params=self.weights + self.biases, macs=macs,
            bitops=macs * self.w_bits * self.a_bits,
            weight_bits=self.weights * self.w_bits + self.biases * FLOAT_BITS,
            act_elems=act, act_bits=act * self.a_bits, calls=self.calls,
        )


def _arg(args: tuple, kwargs: dict, i: int, name: str):
    return args[i] if len(args) > i else kwargs[name]


def _batch(example_inputs) -> int:
    first = example_inputs[0] if isinstance(example_inputs, tuple) and example_inputs else (
        example_inputs)
    if not isinstance(first, torch.Tensor):
        raise ConfigError(
            "measure() reads the batch size from the first example input, which is not a "
            "tensor; pass batch=N (the number of samples in example_inputs)"
        )
    return first.shape[0] if first.dim() > 1 else 1


def measure(model: nn.Module, example_inputs, batch: int | None = None) -> CostReport:
    """Cost of ``model`` per sample of ``example_inputs``.

    Any batch size gives the same figures: totals over the forward pass are divided by
    ``batch``, by default the first dimension of the first example tensor (1 for a 1-D one).
    """
    batch = _batch(example_inputs) if batch is None else batch
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive integer (samples in the example), got {batch!r}")
    tallies: dict[str, _Tally] = {}

    def tally(name: str, mod: nn.Module, weights: int, biases: int, type_: str = "",
              bits: tuple[int, int] | None = None) -> _Tally:
        if name not in tallies:
            w, a = bits or _bits(mod)
            tallies[name] = _Tally(type_ or type(mod).__name__, w, a, weights, biases)
        return tallies[name]

    def layer_hook(name):
        def hook(mod, args, kwargs, out):
            x = _arg(args, kwargs, 0, "input")
            macs = (counts.conv_macs(mod, x, out) if isinstance(mod, _ConvNd)
                    else counts.linear_macs(mod, out))
            tally(name, mod, mod.weight.numel(), _numel(mod.bias)).add(macs, x.numel())
        return hook

    def attention_hook(name):
        def hook(mod, args, kwargs, out):
            q = _arg(args, kwargs, 0, "query")
            k = _arg(args, kwargs, 1, "key")
            v = _arg(args, kwargs, 2, "value")
            shape = counts.attention_shape(mod, q, k)
            proj, matmuls, out_macs = counts.attention_macs(mod, shape)
            inputs = _numel(q, None if k is q else k, None if v is q or v is k else v)
            e, queries = mod.embed_dim, shape.seqs * shape.queries
            weights = _numel(mod.in_proj_weight, mod.q_proj_weight, mod.k_proj_weight,
                             mod.v_proj_weight)
            tally(f"{name}.in_proj", mod, weights,
                  _numel(mod.in_proj_bias, mod.bias_k, mod.bias_v), "Linear").add(proj, inputs)
            tally(f"{name}.attention", mod, 0, 0, "MatMul").add(
                matmuls, (queries + 2 * shape.seqs * shape.attended) * e)
            tally(f"{name}.out_proj", mod.out_proj, mod.out_proj.weight.numel(),
                  _numel(mod.out_proj.bias), "Linear", _bits(mod)).add(out_macs, queries * e)
        return hook

    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    handles = []
    for name, mod in model.named_modules():
        if any(name.startswith(a + ".") for a in attention):
            continue  # the attention's own hook counts its projections
        if isinstance(mod, nn.MultiheadAttention):
            hook = attention_hook(name)
        elif isinstance(mod, (_ConvNd, nn.Linear)):
            hook = layer_hook(name)
        else:
            continue
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    report = CostReport(layers=[t.row(n, batch) for n, t in tallies.items()])
    owners = set(tallies) | {a for a in attention if f"{a}.in_proj" in tallies}
    for name, mod in model.named_modules():
        if any(o in ("", name) or name.startswith(o + ".") for o in owners):
            continue
        report.other_params += sum(p.numel() for p in mod.parameters(recurse=False))
    return report
