"""Errors lowbit raises on bad input.

Every user-facing failure is a ``LowbitError`` whose message names the problem and the fix;
the CLI prints the message and exits non-zero instead of showing a torch stack trace.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class: a problem the user can fix, described in plain words."""


class ConfigError(LowbitError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelError(LowbitError):
    """Unknown model name, unloadable checkpoint, or mismatched state-dict keys."""


class DataError(LowbitError):
    """Unknown dataset, missing path, or a layout lowbit cannot read."""


class CalibrationError(LowbitError):
    """Calibration met NaN/Inf or saw no data."""


class TrainingError(LowbitError):
    """Training stopped: a NaN loss, a collapsed quantizer, or a checkpoint that does not match."""


class OutputError(LowbitError):
    """An output path cannot be written, or writing it would replace another run's results."""


class ExportError(ConfigError):
    """The model holds something an exporter cannot write (the message names it)."""


class LowbitWarning(UserWarning):
    """Base class: something the user should know that does not stop the run."""


class NarrowCalibrationWarning(LowbitWarning):
    """The calibration images cover few of the classes the model predicts, so methods that fit
    the calibration set (block reconstruction, bias correction) specialise the model to them."""
