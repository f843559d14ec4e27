"""Evaluation metrics on a model whose outputs are known."""

import math

import pytest
import torch
from torch import nn

from lowbit.evaluate import evaluate


class Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[x.flatten().long()]


def test_top1_top5_agreement_and_sqnr():
    logits = -0.1 * torch.arange(6.0).repeat(4, 1) + torch.eye(6)[:4] * 5
    model = Fixed(logits)
    x = torch.arange(4).float()[:, None]
    y = torch.tensor([0, 1, 5, 4])
    res = evaluate(model, [(x, y)], progress=False)
    assert res.top1 == 50.0 and res.samples == 4
    assert res.top5 == 75.0
    noisy = Fixed(logits + 0.1)
    res = evaluate(noisy, [(x, y)], reference=model, progress=False)
    assert res.agreement == 100.0
    expected = 10 * math.log10(logits.double().pow(2).sum().item() / (24 * 0.01))
    assert res.sqnr_db == pytest.approx(expected, rel=1e-6)


def test_identical_models_have_infinite_sqnr():
    model = Fixed(torch.randn(3, 4))
    res = evaluate(model, [(torch.arange(3).float()[:, None], torch.zeros(3).long())],
                   reference=model, progress=False)
    assert res.sqnr_db == math.inf and res.agreement == 100.0


def test_empty_evaluation_set_is_an_error():
    from lowbit.errors import DataError

    with pytest.raises(DataError, match="empty"):
        evaluate(Fixed(torch.randn(3, 4)), [], progress=False)


def test_reference_top1_and_paired_standard_error():
    """Two fixed 'models' on eight samples: the paired error of the difference is computed
    from the per-sample differences, not from two independent binomials."""
    class Fixed(nn.Module):
        def __init__(self, preds):
            super().__init__()
            self.preds = torch.tensor(preds)

        def forward(self, x):
            return nn.functional.one_hot(self.preds[x[:, 0].long()], 3).float()

    y = torch.zeros(8, dtype=torch.long)
    x = torch.arange(8).float()[:, None]
    q = Fixed([0, 0, 0, 0, 1, 1, 2, 0])  # right on 5
    ref = Fixed([0, 0, 0, 0, 0, 0, 1, 1])  # right on 6
    res = evaluate(q, [(x, y)], reference=ref, progress=False, channels_last=False)
    assert res.top1 == 62.5 and res.reference_top1 == 75.0
    d = torch.tensor([0, 0, 0, 0, -1, -1, 0, 1], dtype=torch.float64)  # q minus ref, per sample
    assert res.delta_se == pytest.approx(100 * d.std().item() / math.sqrt(8))
    assert "reference (float) top-1 75.00 %" in str(res)
