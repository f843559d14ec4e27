"""EDSR super-resolution networks (Lim et al. 2017, "Enhanced Deep Residual Networks").

The module names follow the public EDSR checkpoints (``sub_mean``, ``head.0``,
``body.N.body.0/2``, ``body.<n_blocks>``, ``tail.0.*``, ``tail.1``, ``add_mean``), so their
state dicts load unchanged. The mean shifts are fixed affine maps held as buffers in a module
that is not a convolution: quantization never touches them, exactly as it should not touch a
normalisation step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ModelError

from .registry import ModelSpec, register_model

# DIV2K's RGB mean, the value every public EDSR checkpoint was trained with
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)
SCALES = (2, 3, 4)


class MeanShift(nn.Module):
    """``x -> x + sign * rgb_range * mean`` per channel, as EDSR's 1x1 conv with fixed weights
    (buffers ``weight``/``bias`` keep the checkpoint keys)."""

    def __init__(self, rgb_range: float, sign: int, mean=DIV2K_MEAN):
        super().__init__()
        self.register_buffer("weight", torch.eye(3).view(3, 3, 1, 1))
        self.register_buffer("bias", sign * rgb_range * torch.tensor(mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class ResBlock(nn.Module):
    """conv-ReLU-conv with an identity skip; ``res_scale`` scales the branch (1.0 in the
    baseline, 0.1 in the wide EDSR)."""

    def __init__(self, channels: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)
        if self.res_scale != 1.0:
            res = res * self.res_scale
        return x + res


def upsampler(scale: int, channels: int) -> nn.Sequential:
    """Sub-pixel upsampling: one conv + PixelShuffle(scale) for 2 and 3, two x2 steps for 4."""
    if scale not in SCALES:
        raise ModelError(f"EDSR upsamples by {', '.join(map(str, SCALES))}, not {scale}")
    steps = [scale] if scale != 4 else [2, 2]
    layers: list[nn.Module] = []
    for s in steps:
        layers += [nn.Conv2d(channels, channels * s * s, 3, padding=1), nn.PixelShuffle(s)]
    return nn.Sequential(*layers)


class EDSR(nn.Module):
    """Input and output are RGB in ``[0, rgb_range]`` (255 for the public checkpoints).

    ``bicubic_skip`` (not in EDSR; VDSR's global residual) adds the bicubic upsampling of the
    input to the output and starts the last conv at zero, so an untrained net is bicubic and a
    few seconds of training already improve on it (the demo's tiny net).
    """

    def __init__(self, scale: int = 2, n_blocks: int = 16, channels: int = 64,
                 res_scale: float = 1.0, rgb_range: float = 255.0, bicubic_skip: bool = False):
        super().__init__()
        if n_blocks < 1 or channels < 1:
            raise ModelError(f"EDSR needs n_blocks >= 1 and channels >= 1, got {n_blocks}, "
                             f"{channels}")
        self.scale = scale
        self.sub_mean = MeanShift(rgb_range, -1)
        self.head = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1))
        self.body = nn.Sequential(
            *[ResBlock(channels, res_scale) for _ in range(n_blocks)],
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.tail = nn.Sequential(upsampler(scale, channels),
                                  nn.Conv2d(channels, 3, 3, padding=1))
        self.add_mean = MeanShift(rgb_range, 1)
        self.bicubic_skip = bicubic_skip
        if bicubic_skip:
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.sub_mean(x))
        y = y + self.body(y)
        if self.bicubic_skip:
            return self.tail(y) + F.interpolate(x, scale_factor=self.scale, mode="bicubic",
                                                align_corners=False)
        return self.add_mean(self.tail(y))


def _register(name: str, scale: int, n_blocks: int, channels: int, description: str,
              weight_sources=None, pretrained: str = "", bicubic_skip: bool = False) -> None:
    def build() -> EDSR:
        return EDSR(scale, n_blocks, channels, bicubic_skip=bicubic_skip)

    # the LR input side is free (fully convolutional); input_size is the calibration/example size
    register_model(ModelSpec(
        name=name, builder=build, num_classes=0, input_size=(3, 48, 48),
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), default_dataset="sr-sklearn",
        description=description, task="super_resolution", scale=scale,
        weight_sources=weight_sources or {}, pretrained=pretrained,
    ))


def _builtin(name: str):
    from pathlib import Path

    def source() -> Path:
        path = Path(__file__).with_name("weights") / f"{name}.safetensors"
        if not path.is_file():
            raise ModelError(f"the builtin weights of {name} are not installed ({path} is "
                             "missing): reinstall lowbit, or pass -w FILE")
        return path
    return source


for _s in SCALES:
    _register(f"edsr_baseline_x{_s}", _s, 16, 64,
              f"EDSR-baseline x{_s} (16 blocks, 64 channels; loads public EDSR checkpoints)")
for _s in (2, 4):
    _register(f"edsr_small_x{_s}", _s, 8, 32, f"small EDSR x{_s} (8 blocks, 32 channels; builtin "
              "weights trained by lowbit on Imagenette photos)",
              weight_sources={"builtin": _builtin(f"edsr_small_x{_s}")}, pretrained="builtin")
_register("edsr_tiny_x2", 2, 2, 16, "tiny EDSR x2 with a bicubic skip (2 blocks, 16 channels; "
          "lowbit demo trains it in seconds)", bicubic_skip=True)
