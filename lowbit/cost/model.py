"""Per-layer cost of a (prepared or float) model, found by tracing shapes in one forward pass.

Definitions (per input sample):

* MACs: conv ``C_out*H_out*W_out * (C_in/groups)*kH*kW``; linear ``out*in`` per row;
* BitOPs: ``MACs * w_bits * a_bits`` (float sides count 32 bits);
* weight memory: ``weight elements * w_bits + bias elements * 32`` bits;
* activation memory: the layer's input elements times ``a_bits`` bits.

Layers that hold parameters but are neither conv nor linear (e.g. an unfolded BatchNorm) add
their parameters at 32 bits to the model size and no MACs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..nn.layers import QuantLayerMixin
from ..prepare import _run

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


def measure(model: nn.Module, example_inputs) -> CostReport:
    """Cost of ``model`` per sample of ``example_inputs`` (any batch size; MACs are per sample)."""
    report = CostReport()
    seen: set[str] = set()
    handles = []

    def hook(mod, inputs, output, name):
        if name in seen:
            return
        seen.add(name)
        x = inputs[0]
        batch = x.shape[0] if x.dim() > 1 else 1
        w_bits, a_bits = _bits(mod)
        if isinstance(mod, nn.Conv2d):
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
            macs = output.numel() // batch * k
        else:
            macs = output.numel() // batch * mod.in_features
        params = mod.weight.numel()
        bias = mod.bias.numel() if mod.bias is not None else 0
        act = x.numel() // batch
        report.layers.append(LayerCost(
            name=name, type=type(mod).__name__, w_bits=w_bits, a_bits=a_bits,
            params=params + bias, macs=macs, bitops=macs * w_bits * a_bits,
            weight_bits=params * w_bits + bias * FLOAT_BITS, act_elems=act, act_bits=act * a_bits,
        ))

    compute = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            compute.add(name)
            handles.append(mod.register_forward_hook(
                lambda m, i, o, n=name: hook(m, i, o, n)))
    try:
        _run(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    for name, mod in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in compute):
            continue
        report.other_params += sum(p.numel() for p in mod.parameters(recurse=False))
    return report
