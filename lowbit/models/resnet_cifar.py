"""He et al. (2016) ResNets for CIFAR: ResNet-20/32/44/56 with parameter-free option-A shortcuts.

State-dict keys follow akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``) so its checkpoints load strictly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .registry import ModelSpec, register_model

CIFAR_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
CIFAR_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class OptionAShortcut(nn.Module):
    """Downsampling shortcut without parameters: stride-2 subsample, zero-pad the channels.

    Option A keeps the parameter count of the paper (0.27 M for ResNet-20); a module rather than
    a lambda so the model pickles, prints and can be matched by quantization passes.
    """

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        p = self.pad_channels
        return nn.functional.pad(x, (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut; separate ReLU modules so each activation is visible."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem (16 ch), three stages of ``n`` blocks (16/32/64 ch), global average pool, linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def _builder(depth: int) -> Callable[..., CifarResNet]:
    blocks = (depth - 2) // 6

    def build(num_classes: int = 10) -> CifarResNet:
        return CifarResNet(blocks, num_classes=num_classes)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} ({blocks} basic blocks per stage)."
    return build


resnet20 = _builder(20)
resnet32 = _builder(32)
resnet44 = _builder(44)
resnet56 = _builder(56)

for _depth, _build in ((20, resnet20), (32, resnet32), (44, resnet44), (56, resnet56)):
    register_model(
        ModelSpec(
            name=f"resnet{_depth}",
            builder=_build,
            num_classes=10,
            input_size=(3, 32, 32),
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            default_dataset="cifar10",
            resize=None,
            description=f"CIFAR ResNet-{_depth} (He et al. 2016, option-A shortcuts)",
            pretrained="CIFAR-10 checkpoints with akamaster/pytorch_resnet_cifar10 keys",
        )
    )
del _depth, _build
