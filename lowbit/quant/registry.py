"""Quantizer registry: a config names a quantizer ``kind``; adding one is one decorated class."""

from __future__ import annotations

from ..errors import ConfigError

QUANTIZERS: dict[str, type] = {}


def register_quantizer(kind: str):
    def wrap(cls):
        QUANTIZERS[kind] = cls
        cls.kind = kind
        return cls

    return wrap


def quantizer_class(kind: str) -> type:
    if kind not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer kind {kind!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[kind]
