"""ImageNet ResNet-18/34 with torchvision state-dict keys, so torchvision checkpoints load as-is.

Differences from torchvision that do not touch the keys: each ReLU is its own module (a
quantizer needs to see every activation separately) and flatten is a module.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import ModelSpec, register_model

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class BasicBlock(nn.Module):
    """3x3-3x3 residual block; ``downsample`` is a 1x1 conv + BN when shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """7x7 stem, max-pool, four stages of basic blocks (64..512 ch), average pool, ``fc``."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        inplanes = 64
        for i, (planes, n) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(inplanes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return self.fc(self.flatten(self.avgpool(x)))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18: 2 blocks per stage, 11.7 M parameters."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    """ResNet-34: 3/4/6/3 blocks per stage, 21.8 M parameters."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes)


for _name, _build, _desc in (
    ("resnet18", resnet18, "ResNet-18 (torchvision keys)"),
    ("resnet34", resnet34, "ResNet-34 (torchvision keys)"),
):
    register_model(
        ModelSpec(
            name=_name,
            builder=_build,
            num_classes=1000,
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            default_dataset="imagenet",
            resize=256,
            description=_desc,
            pretrained="torchvision's ImageNet weights",
        )
    )
del _name, _build, _desc
