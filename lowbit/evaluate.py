"""Evaluation: top-1/top-5, agreement with a float reference, and output SQNR."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import DataError
from .utils import model_device


@dataclass
class EvalResult:
    top1: float
    top5: float
    samples: int
    agreement: float | None = None
    sqnr_db: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = f"top-1 {self.top1:.2f} %  top-5 {self.top5:.2f} %  ({self.samples} samples)"
        if self.agreement is not None:
            s += f"  agreement {self.agreement:.2f} %  SQNR {self.sqnr_db:.1f} dB"
        return s


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Iterable,
    reference: nn.Module | None = None,
    *,
    progress: bool = True,
    desc: str = "eval",
    channels_last: bool = True,
) -> EvalResult:
    """Accuracy of ``model`` on ``(input, target)`` batches; with a ``reference`` (the float
    model), also the % of samples whose top-1 agrees and the SQNR of the logits in dB.

    Counters stay on the device and are read once at the end (no per-batch sync).
    """
    from tqdm.auto import tqdm

    dev = model_device(model)
    model.eval()
    if reference is not None:
        reference.eval()
    zeros = lambda: torch.zeros((), dtype=torch.float64, device=dev)  # noqa: E731
    top1, top5, agree, sig, noise = zeros(), zeros(), zeros(), zeros(), zeros()
    n = 0
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    for x, y in tqdm(data, total=total, desc=desc, disable=not progress, leave=False):
        x, y = x.to(dev), y.to(dev)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        top1 += (pred[:, 0] == y).sum()
        top5 += (pred == y[:, None]).any(dim=1).sum()
        if reference is not None:
            ref = reference(x)
            agree += (ref.argmax(1) == pred[:, 0]).sum()
            sig += ref.double().pow(2).sum()
            noise += (ref.double() - out.double()).pow(2).sum()
        n += y.shape[0]
    if n == 0:
        raise DataError("the evaluation set is empty: pass at least one (input, target) batch")
    result = EvalResult(100.0 * float(top1) / n, 100.0 * float(top5) / n, n)
    if reference is not None:
        result.agreement = 100.0 * float(agree) / n
        nz = float(noise)
        result.sqnr_db = math.inf if nz == 0 else 10.0 * math.log10(float(sig) / nz)
    return result
