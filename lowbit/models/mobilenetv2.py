"""MobileNetV2 1.0 with torchvision state-dict keys (``features.N...``, ``classifier.1``).

``tf_same_padding`` reproduces TensorFlow "SAME" padding for stride-2 convolutions, which
models converted from TF/TFLite need: on an even input TF pads only right/bottom, while
PyTorch's symmetric ``padding=1`` shifts every strided sampling grid by one pixel (about 9
top-1 points lost on the TFLite weights). The pad is an explicit ``nn.ZeroPad2d`` child, not a
hook, so quantization passes and exporters see it; it has no parameters and leaves the keys
unchanged. It equals TF "SAME" whenever the input side is a multiple of 32, as 224 is.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import ModelSpec, register_model
from .resnet import IMAGENET_MEAN, IMAGENET_STD


def tf_same_pad(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF "SAME" padding (left, right, top, bottom) for inputs whose size divides by ``stride``.

    TF pads ``kernel - stride`` in total and puts the odd pixel on the right/bottom: (0, 1) for
    3x3 stride 2, (1, 2) for 5x5 stride 2, symmetric for stride 1.
    """
    total = max(kernel - stride, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2)


class Add(nn.Module):
    """Residual addition as a module, so quantizers can observe and requantize its output."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class ConvBNAct(nn.Module):
    """Conv, BN and optional activation as children ``0``, ``1``, ``2`` (torchvision indices).

    ``pad`` (an ``nn.ZeroPad2d`` or ``None``) runs before the conv; being parameter-free it
    adds no state-dict keys. Indexing (``block[0]``) mirrors ``nn.Sequential``.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: nn.Module | None,
        pad: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.pad = pad
        self.add_module("0", conv)
        self.add_module("1", bn)
        if act is not None:
            self.add_module("2", act)

    def __getitem__(self, idx: int) -> nn.Module:
        module = self._modules.get(str(idx))
        if module is None:
            raise IndexError(f"ConvBNAct has no child {idx}")
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        for key in ("0", "1", "2"):
            module = self._modules.get(key)
            if module is not None:
                x = module(x)
        return x


def conv_bn_relu6(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    *,
    tf_same_padding: bool = False,
    bn_eps: float = 1e-5,
) -> ConvBNAct:
    """Conv-BN-ReLU6; with ``tf_same_padding`` a strided conv gets an explicit TF SAME pad."""
    pad = None
    padding = (kernel - 1) // 2
    if tf_same_padding and stride > 1:
        pad, padding = nn.ZeroPad2d(tf_same_pad(kernel, stride)), 0
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False)
    return ConvBNAct(conv, nn.BatchNorm2d(cout, eps=bn_eps), nn.ReLU6(inplace=False), pad)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), residual when shapes agree."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        expand_ratio: int,
        *,
        tf_same_padding: bool = False,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(cin, hidden, 1, bn_eps=bn_eps))
        layers += [
            conv_bn_relu6(
                hidden,
                hidden,
                3,
                stride,
                groups=hidden,
                tf_same_padding=tf_same_padding,
                bn_eps=bn_eps,
            ),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout, eps=bn_eps),
        ]
        self.conv = nn.Sequential(*layers)
        self.add = Add() if self.use_res_connect else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return self.add(x, out) if self.add is not None else out


# (expand ratio t, output channels c, repeats n, first stride s), from the paper's Table 2.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 width 1.0: stem, 17 inverted residuals, 1x1 conv to 1280, pool, classifier."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        tf_same_padding: bool = False,
        bn_eps: float = 1e-5,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        opts = {"tf_same_padding": tf_same_padding, "bn_eps": bn_eps}
        features: list[nn.Module] = [conv_bn_relu6(3, 32, 3, 2, **opts)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, **opts))
                cin = c
        features.append(conv_bn_relu6(cin, 1280, 1, bn_eps=bn_eps))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def mobilenet_v2(
    num_classes: int = 1000, tf_same_padding: bool = False, bn_eps: float = 1e-5
) -> MobileNetV2:
    """MobileNetV2 1.0 with torchvision defaults (symmetric padding, BN eps 1e-5)."""
    return MobileNetV2(num_classes, tf_same_padding=tf_same_padding, bn_eps=bn_eps)


# The converted BN layers are identities (mean 0, var 1): their eps must vanish next to 1 in
# float32, but be positive, since some torch builds reject eps=0 in batch_norm.
TFLITE_BN_EPS = 1e-12


def mobilenet_v2_tflite(
    num_classes: int = 1000, tf_same_padding: bool = True, bn_eps: float = TFLITE_BN_EPS
) -> MobileNetV2:
    """MobileNetV2 for weights converted from TFLite: TF SAME padding, BN already folded
    (identity BN, eps below float32 resolution at variance 1)."""
    return MobileNetV2(num_classes, tf_same_padding=tf_same_padding, bn_eps=bn_eps)


register_model(
    ModelSpec(
        name="mobilenet_v2",
        builder=mobilenet_v2,
        num_classes=1000,
        input_size=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_dataset="imagenet",
        resize=256,
        description="MobileNetV2 1.0 (torchvision keys and defaults)",
        pretrained="torchvision's ImageNet weights",
    )
)
register_model(
    ModelSpec(
        name="mobilenet_v2_tflite",
        builder=mobilenet_v2_tflite,
        num_classes=1000,
        input_size=(3, 224, 224),
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        default_dataset="imagenet",
        resize=256,
        description="MobileNetV2 1.0 for TFLite-converted weights (TF SAME padding, identity BN)",
        pretrained="TFLite MobileNetV2 weights converted to a state dict",
    )
)
