"""Argument types shared by every ``lowbit`` subcommand."""

from __future__ import annotations

import argparse


def bits_arg(value: str) -> int:
    """A bitwidth from the command line: an integer from 1 to 8."""
    try:
        b = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {value!r}") from None
    if not 1 <= b <= 8:
        raise argparse.ArgumentTypeError(f"bits must be from 1 to 8, got {b}")
    return b


def act_bits_arg(value: str) -> int | None:
    """Activation bits, or ``float`` (also ``32``/``none``) to leave activations unquantized."""
    return None if value.lower() in {"float", "32", "none"} else bits_arg(value)
