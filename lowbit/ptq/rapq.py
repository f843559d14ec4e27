"""RAPQ: power-of-two post-training quantization (after Yao et al., IJCAI 2022).

Four registered methods, all on the same prepared model and calibration tensor:

* ``pot``: naive baseline, each calibrated scale rounded to the nearest power of two.
* ``rapq-quick``: network-wide scale adjustment. Every weight and activation log2 scale is
  relaxed to a continuous value and trained jointly so that the network's output matches the
  float output, which trades rounding error (small scales) against clipping error (large
  scales) across all layers at once; a short second phase trains through the rounded
  exponents (straight-through) before they are fixed. It starts from the least-error
  exponent per channel; if the result is worse than that start on the calibration set, the
  start is kept.
* ``rapq``: quick, then BN-guided block reconstruction (AdaRound-style rounding, PoT scales
  learned with straight-through exponents, loss = block output error + the mismatch of
  pre-activation statistics against the float model's BatchNorm statistics).
* ``brecq``: the same reconstruction with float scales, as a comparison.

The exported exponents and zero-points are integers by construction (see
:mod:`lowbit.quant.pot`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import CalibrationError, ConfigError
from ..prepare import calibrate, float_mode, prepare, quantizers
from ..quant.pot import round_exponent
from ..utils import batch_inputs, model_device
from .bias_correction import correct_bias, float_output_means
from .blocks import run_chunked
from .pot_rescale import MODES as PAIR_MODES
from .pot_rescale import RescaleReport, rescale_pairs
from .reconstruct import (
    ReconOptions,
    bn_targets,
    output_error,
    reconstruct,
    unwrap_quantizers,
    wrap_quantizers,
)
from .registry import register_ptq
from .stream_rescale import rescale_streams

log = logging.getLogger("lowbit")

MIN_CALIB, MAX_CALIB = 8, 16384
N_EVAL = 256  # calibration images on which a step is checked against the one before


def gather_inputs(calib_data: Iterable, num_batches: int | None = None) -> torch.Tensor:
    """The calibration set as one tensor (checked: size in range, every value finite)."""
    batches = []
    for i, batch in enumerate(calib_data):
        if num_batches is not None and i >= num_batches:
            break
        x = batch_inputs(batch)
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"calibration batch {i} holds no tensor input: {type(x).__name__}")
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(
                f"calibration batch {i} contains NaN or Inf; clean the data (check the "
                "normalisation and the image decoding) before quantizing"
            )
        batches.append(x.detach())
    n = sum(b.shape[0] for b in batches)
    if not MIN_CALIB <= n <= MAX_CALIB:
        raise ConfigError(
            f"RAPQ needs between {MIN_CALIB} and {MAX_CALIB} calibration images, got {n}; "
            "1,024 is the usual size (fewer overfit the reconstruction, more only cost memory)"
        )
    x = torch.cat(batches)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# Images per scale-adjustment step, at every input size. 8 at 224 px is about 4x faster
# (264 s vs 1,138 s on MobileNetV2), but MobileNetV2 W4A8 RAPQ then reached 24.99 % against
# 71.87 % (CPU) and 71.11 % (GPU) with 32 (benchmarks/results/rapq*.json).
QUICK_BATCH = 32
# Scale-adjustment steps of rapq-quick. Full rapq skips the adjustment by default: its exponent
# search fits each unit's exponents on the quantized inputs the unit really gets, and with it
# the network error after reconstruction came out the same within 2 % with or without the
# adjustment (MobileNetV2 1,067 vs 1,069, EfficientNet-Lite0 510 vs 519), which at 224 px took
# 1,563-1,710 s at one thread, a third of the run (benchmarks/results/rapq*.json).
QUICK_ITERS = 300


def with_kind(config: QuantConfig, kind: str, observer: str,
              options: dict[str, Any] | None = None) -> QuantConfig:
    """``config`` with every quantizer spec (defaults and rules) of ``kind`` and ``observer``
    (and, when given, those quantizer ``options``)."""
    upd: dict[str, Any] = {"kind": kind, "observer": observer}
    if options is not None:
        upd["options"] = dict(options)
    data = config.model_dump()
    specs = [data["weight"], data["act"]] + [r[s] for r in data["layers"] for s in ("weight", "act")]
    for spec in specs:
        if spec is not None:
            spec.update(upd)
    return QuantConfig.model_validate(data)


def _check_bits(config: QuantConfig) -> None:
    if config.weight is not None and config.weight.bits < 2:
        raise ConfigError(
            f"RAPQ weights need at least 2 bits (signed), got {config.weight.bits}; use w_bits >= 2"
        )


def _calibrated(model, config, x, example_inputs, chunk, progress) -> nn.Module:
    qmodel = prepare(model, config, example_inputs if example_inputs is not None else x[:2])
    qmodel.to(x.device)
    return calibrate(qmodel, _chunks(x, chunk), progress=progress)


def _chunks(x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    return [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]


def adjust_scales(
    qmodel: nn.Module,
    x: torch.Tensor,
    *,
    iters: int = 200,
    batch_size: int = 32,
    lr: float = 0.01,
    seed: int = 0,
    n_eval: int = N_EVAL,
    chunk: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """RAPQ's network-wide adjustment of all power-of-two exponents at once (in place).

    Returns the calibration output error of the starting exponents (``naive_error``: as the
    quantizers were calibrated, nearest or least-error) and of the adjusted ones, and
    whether the adjusted ones were kept (they are only when they do not do worse).
    """
    if iters < 0 or batch_size < 1:
        raise ConfigError(f"quick_iters must be >= 0 and batch_size >= 1, got {iters}, {batch_size}")
    pot = [q for q in quantizers(qmodel) if q.power_of_two]
    if not pot:
        raise ConfigError("scale adjustment needs 'pot' quantizers: prepare with kind='pot'")
    n = x.shape[0]
    qmodel.eval()
    with float_mode(qmodel):
        fp_out = run_chunked(qmodel, (x,), {}, n, chunk)
    if not isinstance(fp_out, torch.Tensor):
        raise ConfigError("scale adjustment needs a model whose output is one tensor")
    m = min(n, n_eval)
    swaps = wrap_quantizers(qmodel, pot=True, learn_w_scale=True, learn_a_scale=True,
                            adaround=False, relax="ste")

    def set_relax(mode: str) -> None:
        for _, _, tq in swaps:
            tq.relax = mode

    @torch.no_grad()
    def calib_error() -> float:
        out = run_chunked(qmodel, (x[:m],), {}, m, chunk)
        return output_error(out, fp_out[:m]).item()

    frozen = [p for p in qmodel.parameters() if p.requires_grad]
    params = [tq.log2_scale for _, _, tq in swaps]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    naive = calib_error()
    final = naive
    try:
        if iters > 0:
            opt = torch.optim.Adam(params, lr=lr)
            gen = torch.Generator().manual_seed(seed)
            bs = min(batch_size, n)
            switch = (2 * iters) // 3
            from tqdm.auto import tqdm

            bar = tqdm(range(iters), desc="adjust scales", disable=not progress, leave=False)
            for it in bar:
                if it == 0:
                    set_relax("continuous")
                if it == switch:
                    set_relax("ste")
                    for g in opt.param_groups:
                        g["lr"] = lr / 4
                idx = torch.randint(0, n, (bs,), generator=gen)
                loss = output_error(qmodel(x[idx]), fp_out[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if progress and (it + 1) % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4g}")
            bar.close()
            set_relax("ste")
            with torch.no_grad():
                for p in params:
                    p.copy_(round_exponent(p))
            final = calib_error()
        kept = final <= naive
        if not kept:
            for _, _, tq in swaps:
                tq.reset()
    finally:
        for p in params:
            p.requires_grad_(False)
        unwrap_quantizers(swaps, commit=True)
        for p in frozen:
            p.requires_grad_(True)
    return {"naive_error": naive, "adjusted_error": final if kept else naive,
            "kept": kept, "seconds": time.perf_counter() - t0, "iters": iters}


@torch.no_grad()
def _outputs(qmodel: nn.Module, x: torch.Tensor, chunk: int, use_float: bool) -> torch.Tensor:
    qmodel.eval()
    if use_float:
        with float_mode(qmodel):
            return run_chunked(qmodel, (x,), {}, x.shape[0], chunk)
    return run_chunked(qmodel, (x,), {}, x.shape[0], chunk)


def _pot_options(method: str, observer: str) -> dict[str, Any] | None:
    """RAPQ starts from the least-error exponent per channel (``rounding="mse"``), not the
    nearest one, which can clip a layer's largest weights (MobileNetV2 collapses at W8A8 from
    that alone). ``pot`` keeps nearest rounding: it is the naive baseline."""
    if method in {"rapq-quick", "rapq"} and observer == "mse":
        return {"rounding": "mse"}
    return None


def _rescale_parts(pot_rescale: bool | str) -> tuple[str | None, bool]:
    """``pot_rescale`` as (layer-pair mode or None, whether linear streams are rescaled):
    ``True`` is ``"depthwise"``; a string joins a pair mode and/or ``"streams"`` with ``+``."""
    if pot_rescale is True:
        return "depthwise", False
    if not pot_rescale:
        return None, False
    known = (*PAIR_MODES, "streams")
    parts = str(pot_rescale).split("+")
    pairs = [p for p in parts if p in PAIR_MODES]
    if any(p not in known for p in parts) or len(pairs) > 1 or len(set(parts)) != len(parts):
        raise ConfigError(
            f"pot_rescale must be True, False, or {' / '.join(map(repr, known))} joined by '+' "
            f"(one pair mode at most, e.g. 'depthwise+streams'), got {pot_rescale!r}")
    return (pairs[0] if pairs else None), "streams" in parts


def _bn_setup(model, example_inputs, config: QuantConfig, bn_guided: bool | None):
    targets, skipped = bn_targets(model, example_inputs, folded=config.fold_bn)
    if bn_guided and not targets:
        why = (f"its {len(skipped)} BatchNorms carry no running statistics (mean 0, var 1)"
               if skipped else "it has no BatchNorm after a conv/linear layer")
        raise ConfigError(
            f"BN-guided reconstruction was forced, but {why}; run with bn_guided=None (auto) or "
            "False to reconstruct from the data term alone"
        )
    if bn_guided is False:
        return {}, "off (bn_guided=False)"
    if not targets:
        note = ("no BatchNorm statistics in this model "
                f"({len(skipped)} BNs without information); BN term off, data term alone")
        log.warning("rapq: %s", note)
        return {}, note
    note = f"on: {len(targets)} BatchNorm targets"
    if skipped:
        note += f", {len(skipped)} BNs without statistics skipped"
    return targets, note


def _recon_options(opts: dict[str, Any], progress: bool, seed: int) -> ReconOptions:
    fields = ReconOptions.__dataclass_fields__
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise ConfigError(f"unknown reconstruction options {unknown}; known: {sorted(fields)}")
    return ReconOptions(**opts, progress=progress, seed=seed)


@register_ptq("pot", "rapq-quick", "rapq", "brecq")
def rapq_ptq(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable,
    example_inputs=None,
    *,
    method: str = "rapq",
    observer: str = "mse",
    quick_iters: int | None = None,
    quick_lr: float = 0.01,
    quick_batch_size: int | None = None,
    bn_guided: bool | None = None,
    bias_correction: bool = False,
    pot_rescale: bool | str = False,
    num_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **recon: Any,
) -> nn.Module:
    """Quantize ``model`` with ``method`` (``pot``, ``rapq-quick``, ``rapq`` or ``brecq``).

    ``quick_iters`` (None: 300 for ``rapq-quick``, 0 for ``rapq``) sets the network-wide scale
    adjustment steps; full ``rapq`` runs it before reconstruction only when asked (``QUICK_ITERS``
    says why). ``recon`` takes :class:`~lowbit.ptq.reconstruct.ReconOptions` fields (``iters``,
    ``batch_size``, ``bn_weight``, ...). ``pot_rescale`` (``True``/``"depthwise"`` or
    ``"all"``) first slides the power-of-two grids of each ``conv -> ReLU6 -> depthwise conv``
    (or every ``conv -> ReLU6 -> conv``) pair against each other, the float model unchanged
    (:mod:`lowbit.ptq.pot_rescale`); ``"streams"`` (alone or joined, ``"depthwise+streams"``)
    scales each linear residual stream by one factor (:mod:`lowbit.ptq.stream_rescale`).
    ``bias_correction`` re-centres every layer's output on the float model's as the last step
    (:mod:`lowbit.ptq.bias_correction`). The returned
    model carries ``lowbit_rapq``: what ran, errors before/after each step, and where the time
    went.
    """
    t_start = time.perf_counter()
    _check_bits(config)
    if quick_iters is None:
        quick_iters = QUICK_ITERS if method == "rapq-quick" else 0
    pair_mode, streams = _rescale_parts(pot_rescale)
    rescale_mode = pair_mode or streams
    if rescale_mode and method == "brecq":
        raise ConfigError(
            "pot_rescale fits power-of-two grids; 'brecq' uses float scales, which rescaling "
            "leaves as good as before: use it with 'pot', 'rapq-quick' or 'rapq'"
        )
    reconstructs = method in {"rapq", "brecq"}
    opts = _recon_options(recon, progress, seed) if reconstructs else None
    if recon and not reconstructs:
        raise ConfigError(f"options {sorted(recon)} apply to 'rapq' and 'brecq' only")
    x = gather_inputs(calib_data, num_batches).to(model_device(model))
    kind = "uniform" if method == "brecq" else "pot"
    config = with_kind(config, kind, observer, _pot_options(method, observer))
    chunk = opts.chunk if opts else 64
    info: dict[str, Any] = {"method": method, "calib_images": x.shape[0]}
    targets, note = ({}, "n/a")
    if reconstructs:
        targets, note = _bn_setup(model, example_inputs, config, bn_guided)
    info["bn_guided"] = note
    t = time.perf_counter()
    qmodel = _calibrated(model, config, x, example_inputs, chunk, progress)
    info["seconds_calibrate"] = time.perf_counter() - t
    if rescale_mode:
        t = time.perf_counter()
        parts = ([rescale_streams(qmodel, x, chunk=chunk, bn_targets=targets)] if streams
                 else []) + ([rescale_pairs(qmodel, x, mode=pair_mode, chunk=chunk,
                                            bn_targets=targets, progress=progress)]
                             if pair_mode else [])
        rep = RescaleReport()
        for part in parts:
            rep.rescaled.update(part.rescaled)
            rep.skipped.update(part.skipped)
        if not rep.rescaled:
            raise ConfigError(
                f"pot_rescale found nothing to rescale (it needs conv -> ReLU/ReLU6 -> conv "
                f"pairs, or linear streams read by convs): {rep.summary()}")
        log.info("rapq: %s", rep.summary())
        qmodel = calibrate(qmodel, _chunks(x, chunk), progress=progress)  # ranges moved
        mode = "+".join(([pair_mode] if pair_mode else []) + (["streams"] if streams else []))
        info["pot_rescale"] = {"mode": mode, "rescaled": rep.rescaled,
                               "skipped": rep.skipped, "seconds": time.perf_counter() - t}
    float_means = float_output_means(qmodel, x) if bias_correction else None
    skip_quick = method == "rapq" and quick_iters == 0
    if method in {"rapq-quick", "rapq"}:
        quick_batch_size = quick_batch_size or QUICK_BATCH
        info["quick_batch_size"] = quick_batch_size
        if not skip_quick:
            info["quick"] = adjust_scales(qmodel, x, iters=quick_iters,
                                          batch_size=quick_batch_size, lr=quick_lr, seed=seed,
                                          chunk=chunk, progress=progress)
    if reconstructs:
        # Reconstruction writes rounded weights into the model, so its float mode is no longer
        # the float model: the reference is taken first.
        x_eval = x[:N_EVAL]
        ref = _outputs(qmodel, x_eval, chunk, use_float=True)
        before = output_error(_outputs(qmodel, x_eval, chunk, use_float=False), ref).item()
        if skip_quick:  # the starting error is the one reconstruction starts from
            info["quick"] = {"naive_error": before, "adjusted_error": before, "kept": True,
                             "seconds": 0.0, "iters": 0}
        backup = copy.deepcopy(qmodel.state_dict())
        rep = reconstruct(qmodel, x, opts, pot=kind == "pot", bn=targets)
        after = output_error(_outputs(qmodel, x_eval, chunk, use_float=False), ref).item()
        kept = after <= before
        if not kept:
            qmodel.load_state_dict(backup)
        info["reconstruction"] = {"error_before": before, "error_after": after, "kept": kept}
        info["units"] = [u.__dict__ for u in rep.units]
        info["seconds_cache"] = rep.seconds_cache
        info["seconds_reconstruct"] = rep.seconds_optimise
        info["lr_round"] = opts.resolved_lr_round()
    if float_means is not None:
        t = time.perf_counter()
        info["bias_correction"] = correct_bias(qmodel, x, float_means)
        info["seconds_bias_correction"] = time.perf_counter() - t
    info["seconds_total"] = time.perf_counter() - t_start
    qmodel.lowbit_rapq = info
    return qmodel


def rapq(
    model: nn.Module,
    calib_data: Iterable,
    w_bits: int = 4,
    a_bits: int | None = 4,
    *,
    quick: bool = False,
    example_inputs=None,
    config: QuantConfig | None = None,
    **options: Any,
) -> nn.Module:
    """Python entry point: power-of-two PTQ of ``model`` at ``w_bits``/``a_bits`` (first and
    last layer at 8 bits), full RAPQ or, with ``quick=True``, scale adjustment only."""
    config = config or QuantConfig.uniform(w_bits, a_bits)
    method = "rapq-quick" if quick else "rapq"
    return rapq_ptq(model, config, calib_data, example_inputs, method=method, **options)
