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


def random_init_arg(p) -> None:
    """``--random-init``: random weights on purpose (a model with known pretrained weights
    otherwise needs ``-w``, since random weights give a plausible-looking wrong number)."""
    p.add_argument("--random-init", action="store_true",
                   help="run with random weights on purpose (without it, a model that has "
                   "known pretrained weights needs -w)")
