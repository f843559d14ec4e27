"""How many of a classifier's classes the calibration images reach, and a warning when few.

Reconstruction and bias correction fit the quantized model to the calibration images; when
those show a few of the classes the model must tell apart, the fit is paid for on the others.
The check is free: it reads the float outputs of the calibration pass that runs anyway.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import NarrowCalibrationWarning

# Narrow: fewer effective classes than this share of the classes the images could reach.
NARROW_SHARE = 0.25


@dataclass
class ClassCoverage:
    """The float model's top-1 classes over the calibration images."""

    images: int
    classes: int  # the model's outputs
    predicted: int  # distinct classes predicted
    effective: float  # exp(entropy) of the predicted-class histogram: 1 = a single class

    @property
    def narrow(self) -> bool:
        return self.classes > 1 and self.effective < NARROW_SHARE * min(self.classes, self.images)

    def message(self) -> str:
        return (
            f"the float model assigns the {self.images} calibration images to {self.predicted} "
            f"of {self.classes} classes (effectively {self.effective:.1f}): methods that fit "
            "the calibration set (rapq, brecq, bias correction) will specialise the model to "
            "them and lose accuracy on the others; calibrate on images of every class the "
            "model must recognise (e.g. --calib-root), docs/calibration.md"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "narrow": self.narrow}


class ClassCounter:
    """Accumulates the top-1 histogram of classifier outputs on their device (no sync)."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None
        self.skip = False

    def update(self, out) -> None:
        if self.skip:
            return
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
            self.skip = True  # not a classifier's logits: nothing to count
            return
        hist = torch.bincount(out.argmax(1), minlength=out.shape[1])
        if self.counts is None:
            self.counts = hist
        elif self.counts.shape == hist.shape:
            self.counts += hist
        else:
            self.skip = True

    def result(self) -> ClassCoverage | None:
        if self.skip or self.counts is None:
            return None
        counts = self.counts.double().cpu()
        n = float(counts.sum())
        p = counts[counts > 0] / n
        effective = math.exp(float(-(p * p.log()).sum()))
        return ClassCoverage(int(n), counts.numel(), int((counts > 0).sum()), effective)


_INSIDE = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside lowbit and torch (their decorators
    included): the user's line that asked for the calibration."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_narrow(coverage: ClassCoverage | None) -> None:
    if coverage is not None and coverage.narrow:
        warnings.warn(coverage.message(), NarrowCalibrationWarning, stacklevel=_caller_level())
