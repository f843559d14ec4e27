"""Brevitas 0.13.4 power-of-two PTQ on the same models, data and split as benchmarks/rapq.py.

A side-by-side peer for RAPQ: Brevitas's own FX post-training flow (the one its
``brevitas_examples`` ImageNet PTQ script runs) with ``po2_scale`` quantizers for weights
(per-channel, symmetric) and activations (per-tensor), then its calibration and bias correction.
Brevitas is *not* a lowbit dependency: install it in a separate venv that sees the system torch
and the editable lowbit, and run this file with that venv's python:

    python -m venv /tmp/brevenv --system-site-packages
    /tmp/brevenv/bin/pip install torch==2.13.0 brevitas==0.13.4 onnx onnxruntime onnxscript \\
        tqdm onnxoptimizer
    /tmp/brevenv/bin/python benchmarks/brevitas_pot.py --models resnet20
    /tmp/brevenv/bin/python benchmarks/brevitas_pot.py --models mobilenet_v2_tflite \\
        --settings W4A8 W4A4

Without Brevitas it prints a SKIP line and exits 0. Protocol as rapq.py: ``build_data`` with a
seeded 1,024-image calibration set, evaluation on the CIFAR-10 test set / the other 2,901
imagenette images; first and last layer (weights and their input) at 8 bits. Brevitas's FX flow
has no first/last option, so those quantizers are re-initialised at 8 bits after ``quantize``
and before calibration, and the bit widths are checked. Model adjustments, each checked to leave
the float outputs unchanged: the CIFAR ResNet's option-A shortcut (tensor slicing, which breaks
Brevitas's bias correction) becomes ``MaxPool2d(1, 2)`` + a channel ``ConstantPad3d``; ReLU6 is
kept (Brevitas's default preprocessing turns it into ReLU, and its default map quantizes it as a
QuantReLU, without the clip at 6): here a Brevitas activation layer that clamps to [0, 6] and then
applies the unsigned power-of-two activation quantizer. First/last layer: their weights, the
QuantIdentity quantizers feeding them and the last layer's output (logits) quantizer, which
Brevitas adds, are 8-bit.
Each (model, setting) runs in its own process (wall time and peak RSS are that run's own).
Results: benchmarks/results/brevitas_pot.{csv,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODELS,
    PROTOCOLS,
    RESULTS,
    load_rows,
    protocol_data,
    provenance,
    run_child,
    save_rows,
    weights,
)

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
INSTALL = ("python -m venv /tmp/brevenv --system-site-packages && /tmp/brevenv/bin/pip install "
           "torch==2.13.0 brevitas==0.13.4 onnx onnxruntime onnxscript tqdm onnxoptimizer; then "
           "run this script with /tmp/brevenv/bin/python")
# The options of brevitas_examples' ImageNet PTQ flow that we use (its defaults, except
# po2_scale and per-channel weights, and ReLU6 kept). Recorded in every row.
BREVITAS_OPTIONS = dict(
    flow="brevitas.graph.quantize.preprocess_for_quantize + quantize (FX), maps from "
         "brevitas_examples...ptq_common.create_quant_maps",
    scale_factor_type="po2_scale",
    weight_quant="Int8WeightPerChannelFixedPoint (let bit_width=W, narrow_range=False, "
                 "scaling_impl=ParameterFromStatsFromParameterScaling)",
    weight_quant_granularity="per_channel", weight_quant_type="sym", weight_param_method="stats",
    act_quant="Int8ActPerTensorFixedPoint (unsigned after ReLU/ReLU6), let bit_width=A",
    act_quant_granularity="per_tensor", act_quant_type="sym", act_param_method="stats",
    act_quant_percentile=99.999, uint_sym_act_for_unsigned_values=True, bias_bit_width=32,
    relu6_to_relu=False, relu6_quant="QuantNonLinearActLayer(act_impl=clamp(0, 6), unsigned act_quant)",
    graph_eq_iterations=20, graph_eq_merge_bias=True, merge_bn=True, bias_corr=True,
    act_equalization=None, gptq=False, gpfq=False, learned_round=None,
    first_last_bits=8,
    first_last_quantizers="first/last layer weights, the QuantIdentity input quantizers in front "
                          "of them and Brevitas's output (logits) quantizer re-initialised at 8 "
                          "bits before calibration",
    model_rewrites="CIFAR ResNet option-A shortcut -> MaxPool2d(1, 2) + ConstantPad3d (float "
                   "outputs checked identical)",
)
FIELDS = ["model", "setting", "w_bits", "a_bits", "top1", "top5", "agreement", "float_top1",
          "eval_images", "calib_images", "first_last_bits_checked", "float_rewrite_max_diff",
          "preprocess_max_diff", "seconds_quantize", "seconds_calibrate",
          "seconds_bias_correction", "ptq_seconds", "eval_seconds", "wall_seconds",
          "peak_rss_mib", "load_avg_start", "threads", "brevitas_version", "torch_version",
          "brevitas_options", "protocol", "protocol_name", "drop", "drop_se", "commit", "command"]


def brevitas_version() -> str | None:
    try:
        import brevitas
    except ImportError:
        return None
    return brevitas.__version__


def rewrite_for_tracing(net):
    """Replace option-A shortcuts by MaxPool2d(1, 2) + channel zero pad (same values)."""
    from torch import nn

    from lowbit.models.resnet_cifar import OptionAShortcut

    count = 0
    for _name, mod in list(net.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, OptionAShortcut):
                p = child.pad_channels
                setattr(mod, child_name, nn.Sequential(
                    nn.MaxPool2d(kernel_size=1, stride=2),
                    nn.ConstantPad3d((0, 0, 0, 0, p, p), 0.0)))
                count += 1
    return count


def relu6_quant_class():
    """A Brevitas activation layer that really clips at 6 before its (unsigned) quantizer.

    Brevitas maps ReLU6 to QuantReLU (no clip at 6), and drops the activation of any
    Hardtanh-based layer (ReLU6 is one) when a quantizer is on, trusting the quantizer's clamp,
    which with statistics-derived power-of-two ranges is not 6. So the clip is a plain module.
    """
    import torch
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    class Clip0To6(torch.nn.Module):  # not an nn.Hardtanh subclass, so Brevitas keeps it
        def __init__(self):  # explicit: Brevitas's injector rejects a *args/**kwargs init
            super().__init__()

        def forward(self, x):
            return torch.clamp(x, 0.0, 6.0)

    class QuantReLU6(QuantNonLinearActLayer):
        def __init__(self, act_quant=None, input_quant=None, return_quant_tensor=False,
                     **kwargs):
            super().__init__(act_impl=Clip0To6, passthrough_act=True, input_quant=input_quant,
                             act_quant=act_quant, return_quant_tensor=return_quant_tensor,
                             **kwargs)

    return QuantReLU6, Clip0To6


def first_last_layers(qnet):
    """(name, module) of the first and last quantized compute layers, in execution order."""
    import brevitas.nn as qnn

    layers = [(n, m) for n, m in qnet.named_modules()
              if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))]
    order = {n: i for i, n in enumerate(node.target for node in qnet.graph.nodes
                                        if node.op == "call_module")}
    layers.sort(key=lambda nm: order[nm[0]])
    return layers[0], layers[-1]


def edge_quantizers(qnet, layer_name):
    """Names of the QuantIdentity modules that exist only for ``layer_name``'s input or output.

    Upstream: every QuantIdentity between the layer and the previous activation function or
    compute layer, looking through shape-only modules (pad, pool, flatten, dropout); for the first
    layer that is the model-input quantizer and the one Brevitas adds after the explicit pad.
    Downstream: the output quantizer Brevitas puts on the last layer (the logits). Activation
    functions (ReLU/ReLU6 outputs) belong to the previous layer and keep the setting's bits.
    """
    import brevitas.nn as qnn
    from brevitas.nn.quant_layer import QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer

    mods = dict(qnet.named_modules(remove_duplicate=False))
    nodes = [n for n in qnet.graph.nodes if n.op == "call_module"]
    node = next(n for n in nodes if n.target == layer_name)
    found, todo = [], [a for a in node.args if hasattr(a, "op")]
    while todo:
        n = todo.pop()
        if n.op != "call_module":
            if n.op != "placeholder":
                todo += [a for a in n.args if hasattr(a, "op")]
            continue
        m = mods[n.target]
        if isinstance(m, qnn.QuantIdentity):
            found.append(n.target)
        elif isinstance(m, (QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer)):
            continue
        todo += [a for a in n.args if hasattr(a, "op")]
    if not found:
        raise RuntimeError(f"no input quantizer found in front of {layer_name}")
    found += [n.target for n in nodes if node in n.args and isinstance(mods[n.target],
                                                                         qnn.QuantIdentity)]
    return found


def set_bits(proxy, bits: int) -> None:
    """Re-initialise a Brevitas quant proxy at ``bits`` (before any calibration)."""
    proxy.quant_injector = proxy.quant_injector.let(bit_width=bits)
    proxy.init_tensor_quant()


def one(model: str, w_bits: int, a_bits: int, args) -> dict:
    """Quantize and evaluate one setting in this process and return its row."""
    import brevitas
    import brevitas.nn as qnn
    import torch
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
    from brevitas.graph.quantize import preprocess_for_quantize, quantize
    from brevitas.nn.quant_layer import QuantNonLinearActLayer
    from brevitas_examples.imagenet_classification.ptq.ptq_common import create_quant_maps
    from torch import nn

    from lowbit.models import get_model

    torch.manual_seed(0)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    data = protocol_data(model, args.protocol, calib_size=args.calib_size,
                         eval_size=args.eval_size, batch_size=args.batch_size, workers=2)
    net = get_model(model, weights(model)).eval()
    x = data.example

    with torch.no_grad():
        ref = net(x)
        fnet = get_model(model, weights(model)).eval()
        rewrites = rewrite_for_tracing(fnet)
        rewrite_diff = float((fnet(x) - ref).abs().max())
        assert rewrite_diff == 0.0, f"rewritten float model differs from lowbit's: {rewrite_diff}"

    o = BREVITAS_OPTIONS
    t = time.perf_counter()
    pnet = preprocess_for_quantize(
        fnet, relu6_to_relu=o["relu6_to_relu"], equalize_iters=o["graph_eq_iterations"],
        equalize_merge_bias=o["graph_eq_merge_bias"], merge_bn=o["merge_bn"])
    with torch.no_grad():
        pre_diff = float((pnet(x) - ref).abs().max())
    rel = pre_diff / float(ref.abs().max())
    assert rel < 1e-4, f"Brevitas preprocessing changed the float model (max diff {pre_diff})"
    n_relu6 = sum(isinstance(m, nn.ReLU6) for m in pnet.modules())

    layer_map, _, act_map, ident_map = create_quant_maps(
        dtype=torch.float32, device="cpu", bias_bit_width=o["bias_bit_width"],
        weight_bit_width=w_bits, weight_param_method=o["weight_param_method"],
        weight_scale_type=o["scale_factor_type"], weight_quant_type=o["weight_quant_type"],
        weight_quant_granularity=o["weight_quant_granularity"], weight_narrow_range=False,
        weight_quant_format="int", act_quant_format="int",
        uint_sym_act_for_unsigned_values=o["uint_sym_act_for_unsigned_values"],
        act_bit_width=a_bits, act_scale_type=o["scale_factor_type"],
        act_scale_computation_type="static", act_param_method=o["act_param_method"],
        act_quant_type=o["act_quant_type"], act_quant_granularity=o["act_quant_granularity"],
        act_quant_percentile=o["act_quant_percentile"])
    quant_relu6, clip = relu6_quant_class()
    act_map[nn.ReLU6] = (quant_relu6, act_map[nn.ReLU6][1])
    qnet = quantize(pnet, compute_layer_map=layer_map, quant_act_map=act_map,
                    quant_identity_map=ident_map)
    # ReLU6 must still clip at 6 inside its quantized replacement.
    r6 = [m for m in qnet.modules() if isinstance(m, quant_relu6)]
    assert len(r6) == n_relu6, (len(r6), n_relu6)
    for m in r6:
        impl = m.act_quant.fused_activation_quant_proxy.activation_impl
        assert isinstance(impl, clip) and not m.act_quant.is_signed, impl

    # First and last layer at 8 bits: weights and the activation quantizer(s) feeding them.
    first, last = first_last_layers(qnet)
    mods = dict(qnet.named_modules(remove_duplicate=False))
    edge_inputs = {}
    for name, layer in (first, last):
        set_bits(layer.weight_quant, 8)
        edge_inputs[name] = edge_quantizers(qnet, name)
        for inp in edge_inputs[name]:
            set_bits(mods[inp].act_quant, 8)
    bits = {}
    for name, layer in qnet.named_modules():
        if isinstance(layer, (qnn.QuantConv2d, qnn.QuantLinear)):
            bits[name] = int(layer.weight_quant.bit_width())
    for name, _ in (first, last):
        assert bits[name] == 8, (name, bits[name])
        for inp in edge_inputs[name]:
            assert int(mods[inp].act_quant.bit_width()) == 8, inp
    inner = {n: b for n, b in bits.items() if n not in (first[0], last[0])}
    assert set(inner.values()) == {w_bits}, inner
    act_bits = {n: int(m.act_quant.bit_width()) for n, m in mods.items()
                if isinstance(m, QuantNonLinearActLayer) and m.act_quant.is_quant_enabled}
    edge_acts = {i for v in edge_inputs.values() for i in v}
    assert {b for n, b in act_bits.items() if n not in edge_acts} == {a_bits}, act_bits
    seconds_quantize = time.perf_counter() - t

    qnet.eval()
    t = time.perf_counter()
    with torch.no_grad(), calibration_mode(qnet):
        for xb, _ in data.calib:
            qnet(xb)
    seconds_calibrate = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad(), bias_correction_mode(qnet):
        for xb, _ in data.calib:
            qnet(xb)
    seconds_bias = time.perf_counter() - t
    ptq_seconds = seconds_quantize + seconds_calibrate + seconds_bias
    # The scales really are powers of two.
    for name, layer in qnet.named_modules():
        if isinstance(layer, (qnn.QuantConv2d, qnn.QuantLinear)):
            s = layer.weight_quant.scale().detach().flatten()
            assert torch.equal(torch.log2(s), torch.round(torch.log2(s))), name
    for name in act_bits:
        s = mods[name].act_quant.scale().detach().flatten()
        assert torch.equal(torch.log2(s), torch.round(torch.log2(s))), name

    t = time.perf_counter()
    n = top1 = top5 = agree = ftop1 = d_sq = 0
    with torch.no_grad():
        for xb, yb in data.eval:
            out, fout = qnet(xb), net(xb)
            pred = out.topk(5, dim=1).indices
            top1 += int((pred[:, 0] == yb).sum())
            top5 += int((pred == yb[:, None]).any(dim=1).sum())
            fpred = fout.argmax(1)
            ftop1 += int((fpred == yb).sum())
            d_sq += int(((pred[:, 0] == yb).int() - (fpred == yb).int()).pow(2).sum())
            agree += int((fpred == pred[:, 0]).sum())
            n += yb.shape[0]
    eval_seconds = time.perf_counter() - t
    return dict(
        model=model, setting=f"W{w_bits}A{a_bits}", w_bits=w_bits, a_bits=a_bits,
        top1=100.0 * top1 / n, top5=100.0 * top5 / n, agreement=100.0 * agree / n,
        float_top1=100.0 * ftop1 / n, drop=100.0 * (ftop1 - top1) / n,
        drop_se=paired_se(top1, ftop1, d_sq, n), protocol_name=args.protocol, eval_images=n, calib_images=len(data.calib.dataset),
        first_last_bits_checked=json.dumps({"first": first[0], "last": last[0],
                                            "quantizers": edge_inputs, "bits": 8}),
        float_rewrite_max_diff=rewrite_diff, shortcut_rewrites=rewrites,
        preprocess_max_diff=pre_diff, relu6_kept=n_relu6,
        seconds_quantize=seconds_quantize, seconds_calibrate=seconds_calibrate,
        seconds_bias_correction=seconds_bias, ptq_seconds=ptq_seconds, eval_seconds=eval_seconds,
        wall_seconds=time.perf_counter() - t0,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        load_avg_start=load, threads=torch.get_num_threads(),
        brevitas_version=brevitas.__version__, torch_version=torch.__version__,
        brevitas_options=json.dumps(BREVITAS_OPTIONS), protocol=data.protocol,
        commit=provenance()["commit"],
    )


def paired_se(hits: int, ref_hits: int, d_sq: int, n: int) -> float:
    """Standard error, in points, of the paired top-1 difference from per-image hit counts."""
    mean = (hits - ref_hits) / n
    var = max(0.0, d_sq / n - mean**2) * n / max(1, n - 1)
    return 100.0 * (var / n) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"], choices=list(MODELS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--protocol", default="imagenette", choices=PROTOCOLS,
                    help="ImageNet models: diverse (calibrate on 650 of imagenet-val-1300, "
                    "evaluate on the other 649), narrow (calibrate on imagenette, evaluate on all "
                    "of imagenet-val-1300) or imagenette (10 classes both)")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "brevitas_pot"))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "W", "A"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if brevitas_version() is None:
        print(f"SKIP: brevitas is not importable from {sys.executable}. Install it in its own "
              f"venv (never as a lowbit dependency): {INSTALL}")
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        m, w, a = args.one
        print("ROW " + json.dumps(one(m, int(w), int(a), args)))
        return
    out = Path(args.out)
    rows = load_rows(out)
    common = ["--calib-size", str(args.calib_size), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads), "--protocol", args.protocol]
    if args.eval_size:
        common += ["--eval-size", str(args.eval_size)]
    for m in args.models:
        for s in args.settings:
            w, a = SETTINGS[s]
            cmd = [sys.executable, __file__, "--one", m, str(w), str(a), *common]
            row = run_child(cmd, f"{m} {s}")
            if row is None:
                return
            row["command"] = ("OMP_WAIT_POLICY=PASSIVE /tmp/brevenv/bin/python "
                              "benchmarks/brevitas_pot.py --models " + m + " --settings " + s
                              + " " + " ".join(common))
            key = (m, s, args.protocol)
            rows = [r for r in rows if (r["model"], r["setting"],
                                        r.get("protocol_name") or "imagenette") != key] + [row]
            save_rows(out, rows, FIELDS)
            print(f"{m:<20} brevitas-pot {s}  top-1 {row['top1']:.2f} (float "
                  f"{row['float_top1']:.2f})  (ptq {row['ptq_seconds']:.0f} s, wall "
                  f"{row['wall_seconds']:.0f} s, {row['peak_rss_mib']:.0f} MiB, load "
                  f"{row['load_avg_start']:.1f})", flush=True)


if __name__ == "__main__":
    main()
