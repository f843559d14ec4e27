"""Tiny models shared by the tests."""

import torch
from torch import nn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class Tiny(nn.Module):
    """conv-BN-ReLU, depthwise conv-BN-ReLU, a residual add, pool, Linear-BN1d, and an
    unsupported layer (Conv1d), registered out of execution order on purpose."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 5)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 8)
        self.bn_fc = nn.BatchNorm1d(8)
        self.odd = nn.Conv1d(1, 1, 1)

    def forward(self, x):
        x = self.relu(self.bn_stem(self.stem(x)))
        x = x + self.relu(self.bn_dw(self.dw(x)))
        x = self.pool(x).flatten(1)
        x = self.relu(self.bn_fc(self.fc(x)))
        x = self.odd(x[:, None, :])[:, 0, :]
        return self.head(x)


def tiny() -> Tiny:
    torch.manual_seed(0)
    return randomize_bn(Tiny())


def calibrated(cls, x: torch.Tensor, **kw):
    """A quantizer of class ``cls`` calibrated on ``x`` and switched to quantize mode."""
    from lowbit.quant import QuantMode

    q = cls(**kw)
    q.mode = QuantMode.CALIBRATE
    q(x)
    q.finish_calibration()
    q.mode = QuantMode.QUANTIZE
    return q
