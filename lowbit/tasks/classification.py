"""Image classification: top-1/top-5, agreement with a float reference, and logit SQNR."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.errors import ConfigError, DataError
from lowbit.utils import model_device

from .base import Task, check_dataset_task, register_task

log = logging.getLogger("lowbit")


@dataclass
class EvalResult:
    top1: float
    top5: float
    samples: int
    agreement: float | None = None
    sqnr_db: float | None = None
    reference_top1: float | None = None  # the reference's top-1 on the same samples
    delta_se: float | None = None  # paired standard error of top1 - reference_top1, in points

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = f"top-1 {self.top1:.2f} %  top-5 {self.top5:.2f} %  ({self.samples} samples)"
        if self.agreement is not None:
            s += f"  agreement {self.agreement:.2f} %  SQNR {self.sqnr_db:.1f} dB"
        if self.reference_top1 is not None:
            s += (f"\n  reference (float) top-1 {self.reference_top1:.2f} %: difference "
                  f"{self.top1 - self.reference_top1:+.2f} +- {self.delta_se:.2f} points "
                  "(paired standard error)")
        return s


@torch.no_grad()
def evaluate_classifier(
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
    ref_top1, d_sq = zeros(), zeros()
    n = 0
    t0 = time.perf_counter()
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    for x, y in tqdm(data, total=total, desc=desc, disable=not progress, leave=False):
        x, y = x.to(dev), y.to(dev)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        if out.dim() != 2 or y.dim() != 1:
            raise DataError(
                f"classification needs logits [N, classes] and class labels; the model gave "
                f"{tuple(out.shape)} for targets {tuple(y.shape)}: is this another task's model "
                "or dataset? (a model spec's task chooses the metrics)")
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        hit = pred[:, 0] == y
        top1 += hit.sum()
        top5 += (pred == y[:, None]).any(dim=1).sum()
        if reference is not None:
            ref = reference(x)
            ref_pred = ref.argmax(1)
            agree += (ref_pred == pred[:, 0]).sum()
            ref_hit = ref_pred == y
            ref_top1 += ref_hit.sum()
            d_sq += (hit != ref_hit).sum()  # (hit - ref_hit)^2 is 1 exactly where they differ
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
        result.reference_top1 = 100.0 * float(ref_top1) / n
        mean_d = (float(top1) - float(ref_top1)) / n
        var_d = max(0.0, float(d_sq) / n - mean_d**2) * n / max(1, n - 1)
        result.delta_se = 100.0 * math.sqrt(var_d / n)
    log.info("%s: top-1 %.2f %% on %d images (%.1f s)", desc, result.top1, n,
             time.perf_counter() - t0)
    return result


class Classification(Task):
    name = "classification"
    losses = ("ce",)
    score_keys = ("top1",)
    distillation = True

    def datasets(self) -> list[str]:
        from lowbit.data import list_datasets

        return list_datasets()

    def build_data(self, spec, dataset, root, **options):
        from lowbit.pipeline import build_classification_data

        check_dataset_task(spec, dataset or spec.default_dataset)
        return build_classification_data(spec, dataset, root, **options)

    def evaluate(self, model, data, reference, *, spec=None, progress, desc, channels_last):
        return evaluate_classifier(model, data, reference, progress=progress, desc=desc,
                                   channels_last=channels_last)

    def ptq_rows(self, float_res, q_res, label):
        rows = [dict(model="float", top1=float_res.top1, top5=float_res.top5, agree=100.0),
                dict(model=label, top1=q_res.top1, top5=q_res.top5, agree=q_res.agreement)]
        return rows, ["top1", "top5", "agree"]

    def eval_rows(self, res, label):
        rows = [dict(model="float", top1=res.reference_top1, agree=100.0),
                dict(model=label, top1=res.top1, agree=res.agreement)]
        return rows, ["top1", "agree"]

    def loss(self, name, cfg):
        import functools

        import torch.nn.functional as F

        return functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)

    def check_training(self, spec, loss, dataset):
        from lowbit.data import is_labeled

        if loss == "ce" and not is_labeled(dataset):
            raise ConfigError(
                f"the training images ({dataset!r}) have no labels, so the cross-entropy loss "
                "cannot train on them: use --loss kd (distils from the float model; no labels "
                "are read)")

    def train_set(self, spec, dataset, root, *, patch=None):
        from lowbit.data import load_dataset
        from lowbit.pipeline import dataset_kwargs

        return load_dataset(dataset, root, "train", **dataset_kwargs(spec, dataset))

    def scores(self, res):
        return {"top1": res.top1}

    def headline(self, scores):
        return f"top-1 {scores['top1']:.2f} %"

    def accepts(self, inputs, targets):
        return targets.dim() == 1 and not targets.is_floating_point()


register_task(Classification())
