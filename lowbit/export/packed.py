"""Packed low-bit weights: codes packed into bytes (safetensors) plus a JSON manifest.

Each weight's codes are stored as unsigned offsets from the lowest code (binary weights as one
bit, 1 for +1), in the smallest container of 1, 2, 4 or 8 bits that holds them, several per
byte, first element in the lowest bits. The manifest says per tensor its shape, bits, container,
signedness, code range, scale (or power-of-two exponent) and zero-point, per layer its input
grid and int32 bias, and lists the graph's ops in order, so a runtime needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .integer import Grid, IntegerModel

CONTAINERS = (1, 2, 4, 8)
FORMAT = "lowbit-packed/1"


def container_bits(bits: int) -> int:
    return next(c for c in CONTAINERS if c >= bits)


def pack_codes(codes: torch.Tensor, bits: int, qmin: int, binary: bool = False) -> torch.Tensor:
    """Codes (any integer dtype) to a flat uint8 tensor, ``8 / container`` codes per byte."""
    c = 1 if binary else container_bits(bits)
    u = (codes > 0).to(torch.int64) if binary else codes.to(torch.int64) - qmin
    if bool(((u < 0) | (u >= 2**c)).any()):
        raise ValueError(f"codes outside the {bits}-bit range starting at {qmin}")
    per = 8 // c
    flat = u.flatten()
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * c
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, shape, bits: int, qmin: int,
                 binary: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes of ``shape``."""
    c = 1 if binary else container_bits(bits)
    per = 8 // c
    n = 1
    for s in shape:
        n *= int(s)
    shifts = torch.arange(per, dtype=torch.int64) * c
    u = (packed.to(torch.int64)[:, None] >> shifts) & (2**c - 1)
    u = u.flatten()[:n].reshape(tuple(shape))
    codes = 2 * u - 1 if binary else u + qmin
    return codes.to(torch.int32)


def _grid_entry(g: Grid) -> dict:
    entry = {"bits": g.bits, "signed": g.signed, "qmin": g.qmin, "qmax": g.qmax,
             "zero_point": g.zero_point.tolist(), "axis": g.axis}
    if g.power_of_two:
        entry["exponent"] = (torch.frexp(g.scale)[1] - 1).tolist()
    else:
        entry["scale"] = g.scale.tolist()
    return entry


def packed_tensors(im: IntegerModel) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to store and the manifest describing them."""
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, lf in im.layers.items():
        form = lf.weight_form
        qmin, qmax = form.qrange
        binary = form.bits == 1 and form.signed
        key = f"{name}.weight"
        tensors[key] = pack_codes(form.codes, form.bits, qmin, binary)
        w = {"key": key, "shape": list(form.codes.shape), "bits": form.bits,
             "container": 1 if binary else container_bits(form.bits), "signed": form.signed,
             "narrow_range": form.narrow_range, "binary": binary, "qmin": qmin, "qmax": qmax,
             "zero_point": form.zero_point.reshape(-1).tolist(), "axis": 0}
        if form.exponent is not None:
            w["exponent"] = form.exponent.reshape(-1).tolist()
        else:
            w["scale"] = form.scale.reshape(-1).tolist()
        entry = {"type": type(lf.module).__name__, "weight": w, "input": _grid_entry(lf.input_grid)}
        mod = lf.module
        if hasattr(mod, "stride"):
            entry.update(stride=list(mod.stride), padding=list(mod.padding),
                         dilation=list(mod.dilation), groups=mod.groups)
        if lf.bias is not None:
            tensors[f"{name}.bias"] = lf.bias.to(torch.int32)
            entry["bias"] = {"key": f"{name}.bias", "dtype": "int32",
                             "scale": lf.acc_scale.tolist()}
        target = im.targets.get(next(op.node for op in im.ops if op.name == name))
        if target is not None:
            entry["output"] = _grid_entry(Grid.of(target))
        layers[name] = entry
    graph = [{"name": op.name, "kind": op.kind,
              "inputs": [a.name for a in op.args if hasattr(a, "name")]} for op in im.ops]
    manifest = {"format": FORMAT, "layers": layers, "graph": graph}
    return tensors, manifest


def read_packed(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every layer's weight codes (int32, unpacked) and int32 bias from a packed folder."""
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    tensors = load_file(str(directory / "weights.safetensors"))
    out = {}
    for entry in manifest["layers"].values():
        w = entry["weight"]
        out[w["key"]] = unpack_codes(tensors[w["key"]], w["shape"], w["bits"], w["qmin"],
                                     w["binary"])
        if "bias" in entry:
            out[entry["bias"]["key"]] = tensors[entry["bias"]["key"]]
    return out
