"""A tiny CNN for scikit-learn's 8x8 digits: trains in seconds on a CPU, so tests and examples
can exercise quantization end to end on a real (if small) trained network.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import ModelSpec, register_model


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    ]


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (16, 32, 32 ch; the second strides 2), pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 16),
            *_conv_bn_relu(16, 32, stride=2),
            *_conv_bn_relu(32, 32),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """The digits CNN (about 14 k parameters)."""
    return DigitsCNN(num_classes)


register_model(
    ModelSpec(
        name="digits_cnn",
        builder=digits_cnn,
        num_classes=10,
        input_size=(1, 8, 8),
        mean=(0.0,),
        std=(16.0,),
        default_dataset="digits",
        resize=None,
        description="tiny CNN for scikit-learn's 8x8 digits (pixels 0..16)",
    )
)
