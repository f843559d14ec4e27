"""RAPQ: power-of-two post-training quantization (after Yao et al., IJCAI 2022).

Four registered methods, one handler each (their options: :mod:`lowbit.ptq.configs`), built
from the same steps on the same prepared model and calibration tensor:

* ``pot``: naive baseline, each calibrated scale rounded to the nearest power of two.
* ``rapq-quick``: network-wide scale adjustment. Every weight and activation log2 scale is
  relaxed to a continuous value and trained jointly so that the network's output matches the
  float output, which trades rounding error (small scales) against clipping error (large
  scales) across all layers at once; a short second phase trains through the rounded
  exponents (straight-through) before they are fixed. It starts from the least-error
  exponent per channel; if the result is worse than that start on the calibration set, the
  start is kept.
* ``rapq``: BN-guided block reconstruction (each unit's exponent search, AdaRound-style
  rounding, loss = block output error + the mismatch of pre-activation statistics against the
  float model's BatchNorm statistics); the network-wide adjustment first only when asked.
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
from .configs import BrecqConfig, PotConfig, RapqConfig, RapqQuickConfig
from .pot_rescale import rescale_pairs
from .reconstruct import (
    N_EVAL,
    ReconOptions,
    bn_targets,
    output_error,
    reconstruct,
    unwrap_quantizers,
    wrap_quantizers,
)
from .registry import ptq, register_ptq
from .synthetic import diversify

log = logging.getLogger("lowbit")

MIN_CALIB, MAX_CALIB = 8, 16384
CHUNK = 64  # images per forward pass outside the optimisation steps (methods without ``chunk``)
QUICK_LR = 0.01  # Adam's learning rate of the log2 scales in the network-wide adjustment


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
            f"calibration-set methods (rapq, brecq, dqss) need between {MIN_CALIB} and "
            f"{MAX_CALIB} calibration images, got {n}; "
            "1,024 is the usual size (fewer overfit the reconstruction, more only cost memory)"
        )
    x = torch.cat(batches)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


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
    seed: int = 0,
    chunk: int = CHUNK,
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
    m = min(n, N_EVAL)
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
            opt = torch.optim.Adam(params, lr=QUICK_LR)
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
                        g["lr"] = QUICK_LR / 4
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


def _start(model, config: QuantConfig, calib_data, mc, kind: str,
           options: dict[str, Any] | None = None):
    """The checked calibration tensor, ``config`` with every quantizer of ``kind``, and the
    run's report with its first entries."""
    _check_bits(config)
    x = gather_inputs(calib_data, mc.num_batches).to(model_device(model))
    config = with_kind(config, kind, mc.observer, options)
    return x, config, {"method": mc.method, "calib_images": x.shape[0]}


def _least_error(mc) -> dict[str, Any] | None:
    """RAPQ starts from the least-error exponent per channel (``rounding="mse"``), not the
    nearest one, which can clip a layer's largest weights (MobileNetV2 collapses at W8A8 from
    that alone). ``pot`` keeps nearest rounding: it is the naive baseline."""
    return {"rounding": "mse"} if mc.observer == "mse" else None


def _calibrate_step(model, config, x, example_inputs, chunk, progress, info) -> nn.Module:
    t = time.perf_counter()
    qmodel = _calibrated(model, config, x, example_inputs, chunk, progress)
    info["seconds_calibrate"] = time.perf_counter() - t
    return qmodel


def _rescale_step(qmodel, x, mode: str | None, chunk, targets, progress, info) -> nn.Module:
    """Power-of-two-aware rescaling of layer pairs (``mode``; None: off), then recalibration
    (the ranges moved)."""
    if mode is None:
        return qmodel
    t = time.perf_counter()
    rep = rescale_pairs(qmodel, x, chunk=chunk, bn_targets=targets, progress=progress)
    if not rep.rescaled:
        raise ConfigError(
            f"pot_rescale found nothing to rescale (it needs conv -> ReLU/ReLU6 -> depthwise "
            f"conv pairs): {rep.summary()}")
    log.info("rapq: %s", rep.summary())
    qmodel = calibrate(qmodel, _chunks(x, chunk), progress=progress)
    info["pot_rescale"] = {"mode": mode, "rescaled": rep.rescaled,
                           "skipped": rep.skipped, "seconds": time.perf_counter() - t}
    return qmodel


def _quick_step(qmodel, x, mc, chunk, progress, info) -> None:
    """The network-wide adjustment (``mc.quick_iters`` steps); full rapq skips it at 0."""
    info["quick_batch_size"] = mc.quick_batch_size
    if mc.method == "rapq" and mc.quick_iters == 0:
        return
    info["quick"] = adjust_scales(qmodel, x, iters=mc.quick_iters,
                                  batch_size=mc.quick_batch_size, seed=mc.seed, chunk=chunk,
                                  progress=progress)


def _recon_step(qmodel, x, opts: ReconOptions, pot: bool, targets, info) -> None:
    """Block reconstruction (power-of-two scales or float ones); the model is restored when it
    ends with a higher output error."""
    # Reconstruction writes rounded weights into the model, so its float mode is no longer
    # the float model: the reference is taken first.
    x_eval = x[:N_EVAL]
    ref = _outputs(qmodel, x_eval, opts.chunk, use_float=True)
    before = output_error(_outputs(qmodel, x_eval, opts.chunk, use_float=False), ref).item()
    if "quick" not in info and pot:  # the starting error is the one reconstruction starts from
        info["quick"] = {"naive_error": before, "adjusted_error": before, "kept": True,
                         "seconds": 0.0, "iters": 0}
    backup = copy.deepcopy(qmodel.state_dict())
    rep = reconstruct(qmodel, _diversified(qmodel, x, opts, targets, info), opts, pot=pot,
                      bn=targets)
    after = output_error(_outputs(qmodel, x_eval, opts.chunk, use_float=False), ref).item()
    kept = after <= before
    if not kept:
        qmodel.load_state_dict(backup)
    info["reconstruction"] = {"error_before": before, "error_after": after, "kept": kept}
    info["units"] = [u.__dict__ for u in rep.units]
    info["seconds_cache"] = rep.seconds_cache
    info["seconds_reconstruct"] = rep.seconds_optimise
    info["lr_round"] = opts.resolved_lr_round()


def _diversified(qmodel, x, opts: ReconOptions, targets, info) -> torch.Tensor:
    """The reconstruction's inputs: ``x``, a share of it pushed toward random classes when
    ``opts.diversify`` says so (``auto``: the calibration set covers few classes)."""
    cover = getattr(getattr(qmodel, "lowbit_report", None), "calib_coverage", None)
    on = opts.diversify == "on" or (opts.diversify == "auto" and cover is not None
                                    and cover.narrow)
    if not on or opts.diversify_share == 0 or opts.diversify_steps == 0:
        info["diversify"] = {"mode": opts.diversify, "applied": False}
        return x
    t = time.perf_counter()
    out = diversify(qmodel, x, targets, share=opts.diversify_share,
                    steps=opts.diversify_steps, seed=opts.seed)
    info["diversify"] = {"mode": opts.diversify, "applied": out is not x,
                         "share": opts.diversify_share, "steps": opts.diversify_steps,
                         "bn_targets": len(targets), "seconds": time.perf_counter() - t}
    if out is not x:
        log.info("rapq: %d of %d calibration images pushed toward random classes for "
                 "reconstruction", int(round(opts.diversify_share * x.shape[0])), x.shape[0])
    return out


def _finish(qmodel, x, float_means, info, t_start) -> nn.Module:
    """Bias correction when asked (``float_means`` taken before the other steps), the total
    time, and the report on the model as ``lowbit_rapq``."""
    if float_means is not None:
        t = time.perf_counter()
        info["bias_correction"] = correct_bias(qmodel, x, float_means)
        info["seconds_bias_correction"] = time.perf_counter() - t
    info["seconds_total"] = time.perf_counter() - t_start
    qmodel.lowbit_rapq = info
    return qmodel


def _float_means(qmodel, x, mc):
    return float_output_means(qmodel, x) if mc.bias_correction else None


@register_ptq(PotConfig)
def pot_ptq(model: nn.Module, config: QuantConfig, calib_data: Iterable, example_inputs,
            mc: PotConfig, *, progress: bool = True) -> nn.Module:
    """Naive power of two: range calibration, each scale rounded to the nearest ``2**k``."""
    t_start = time.perf_counter()
    x, config, info = _start(model, config, calib_data, mc, "pot")
    info["bn_guided"] = "n/a"
    qmodel = _calibrate_step(model, config, x, example_inputs, CHUNK, progress, info)
    qmodel = _rescale_step(qmodel, x, mc.pot_rescale, CHUNK, {}, progress, info)
    return _finish(qmodel, x, _float_means(qmodel, x, mc), info, t_start)


@register_ptq(RapqQuickConfig)
def rapq_quick_ptq(model: nn.Module, config: QuantConfig, calib_data: Iterable, example_inputs,
                   mc: RapqQuickConfig, *, progress: bool = True) -> nn.Module:
    """Least-error starting exponents, then the network-wide adjustment of all of them."""
    t_start = time.perf_counter()
    x, config, info = _start(model, config, calib_data, mc, "pot", _least_error(mc))
    info["bn_guided"] = "n/a"
    qmodel = _calibrate_step(model, config, x, example_inputs, CHUNK, progress, info)
    qmodel = _rescale_step(qmodel, x, mc.pot_rescale, CHUNK, {}, progress, info)
    float_means = _float_means(qmodel, x, mc)
    _quick_step(qmodel, x, mc, CHUNK, progress, info)
    return _finish(qmodel, x, float_means, info, t_start)


@register_ptq(RapqConfig)
def rapq_ptq(model: nn.Module, config: QuantConfig, calib_data: Iterable, example_inputs,
             mc: RapqConfig, *, progress: bool = True, block_types=None) -> nn.Module:
    """Full RAPQ: least-error starting exponents, optional adjustment, then BN-guided block
    reconstruction with power-of-two scales. The returned model carries ``lowbit_rapq``: what
    ran, errors before/after each step, and where the time went."""
    t_start = time.perf_counter()
    opts = mc.recon_options(progress, block_types)
    x, config, info = _start(model, config, calib_data, mc, "pot", _least_error(mc))
    targets, info["bn_guided"] = _bn_setup(model, example_inputs, config, mc.bn_guided)
    qmodel = _calibrate_step(model, config, x, example_inputs, opts.chunk, progress, info)
    qmodel = _rescale_step(qmodel, x, mc.pot_rescale, opts.chunk, targets, progress, info)
    float_means = _float_means(qmodel, x, mc)
    _quick_step(qmodel, x, mc, opts.chunk, progress, info)
    _recon_step(qmodel, x, opts, True, targets, info)
    return _finish(qmodel, x, float_means, info, t_start)


@register_ptq(BrecqConfig)
def brecq_ptq(model: nn.Module, config: QuantConfig, calib_data: Iterable, example_inputs,
              mc: BrecqConfig, *, progress: bool = True, block_types=None) -> nn.Module:
    """BRECQ-style block reconstruction with float scales (the comparison for RAPQ)."""
    t_start = time.perf_counter()
    opts = mc.recon_options(progress, block_types)
    x, config, info = _start(model, config, calib_data, mc, "uniform")
    targets, info["bn_guided"] = _bn_setup(model, example_inputs, config, mc.bn_guided)
    qmodel = _calibrate_step(model, config, x, example_inputs, opts.chunk, progress, info)
    float_means = _float_means(qmodel, x, mc)
    _recon_step(qmodel, x, opts, False, targets, info)
    return _finish(qmodel, x, float_means, info, t_start)


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
    last layer at 8 bits), full RAPQ or, with ``quick=True``, scale adjustment only;
    ``options`` are :class:`~lowbit.ptq.configs.RapqConfig` (or ``RapqQuickConfig``) fields
    and ``progress``."""
    return ptq(model, "rapq-quick" if quick else "rapq", calib_data,
               config or QuantConfig.uniform(w_bits, a_bits), example_inputs, **options)
