"""Typed, serialisable quantization configs.

A :class:`QuantConfig` says, for every quantizable layer, which quantizer its weight and its
input get and with how many bits. Rules select layers by exact name, glob pattern, or layer
type; a mixed-precision result is simply a config with one exact-name rule per layer, saved
as YAML or JSON and re-applied with :func:`lowbit.prepare`.

Precedence, lowest to highest: the defaults, type rules, glob rules, the first/last-layer
policy, exact-name rules (ties: the later rule wins). So ``match: "*"`` never silently
overrides the first/last policy, while naming a layer exactly always does.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .quant.base import MAX_BITS, MIN_BITS, Quantizer
from .quant.observers import OBSERVERS
from .quant.registry import quantizer_class
from .utils import atomic_write_text


class QuantizerSpec(BaseModel):
    """How one tensor is quantized: quantizer kind, bits, granularity and range observer."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "uniform"
    bits: int = 8
    signed: bool | None = Field(None, description="None: decided from calibration data")
    symmetric: bool = True
    per_channel: bool = False
    ch_axis: int = 0
    narrow_range: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    options: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for this quantizer kind"
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not MIN_BITS <= v <= MAX_BITS:
            raise ValueError(f"bits must be from {MIN_BITS} to {MAX_BITS}, got {v}")
        return v

    @field_validator("observer")
    @classmethod
    def _observer(cls, v: str) -> str:
        if v not in OBSERVERS:
            raise ValueError(f"unknown observer {v!r}; choose one of {sorted(OBSERVERS)}")
        return v

    @field_validator("percentile")
    @classmethod
    def _percentile(cls, v: float) -> float:
        if not 50.0 < v <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {v}")
        return v

    def build(self, **overrides: Any) -> Quantizer:
        """Instantiate the quantizer this spec describes."""
        cls = quantizer_class(self.kind)
        kwargs = dict(
            bits=self.bits, signed=self.signed, symmetric=self.symmetric,
            per_channel=self.per_channel, ch_axis=self.ch_axis, narrow_range=self.narrow_range,
            observer=self.observer,
            observer_kwargs={"percentile": self.percentile} if self.observer == "percentile" else {},
        )
        kwargs.update(self.options)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"quantizer kind {self.kind!r} rejected its options: {e}") from None

    def merged(self, overrides: dict[str, Any] | None, bits: int | None = None) -> QuantizerSpec:
        data = self.model_dump()
        data.update(overrides or {})
        if bits is not None:
            data["bits"] = bits
        return validate_model(QuantizerSpec, data, "layer rule")


class EdgePolicy(str, Enum):
    """What happens to the first and last quantizable layers (the papers keep them high)."""

    SAME = "same"
    INT8 = "8bit"
    FLOAT = "float"


# Type label of a Conv2d with one input channel per group. ``type:DepthwiseConv2d`` selects
# these alone; ``type:Conv2d`` still selects every Conv2d, depthwise included.
DEPTHWISE = "DepthwiseConv2d"


class LayerRule(BaseModel):
    """Overrides for the layers that ``match`` selects.

    ``match`` is an exact module name (``layer1.0.conv1``), a glob (``layer3.*``), or a type
    (``type:Linear``, ``type:DepthwiseConv2d``). ``weight``/``act`` hold partial
    :class:`QuantizerSpec` fields.
    """

    model_config = ConfigDict(extra="forbid")

    match: str
    keep_float: bool = False
    w_bits: int | None = None
    a_bits: int | None = None
    weight: dict[str, Any] | None = None
    act: dict[str, Any] | None = None

    @field_validator("w_bits", "a_bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        return v if v is None else QuantizerSpec._bits(v)

    @property
    def specificity(self) -> int:
        if self.match.startswith("type:"):
            return 0
        if any(c in self.match for c in "*?["):
            return 1
        return 3

    def matches(self, name: str, type_name: str) -> bool:
        if self.match.startswith("type:"):
            want = self.match[5:]
            return want == type_name or (want == "Conv2d" and type_name == DEPTHWISE)
        if self.specificity == 1:
            return fnmatch.fnmatchcase(name, self.match)
        return self.match == name


@dataclass
class LayerPlan:
    """The resolved quantization of one layer (``None`` specs keep that side in float)."""

    weight: QuantizerSpec | None
    act: QuantizerSpec | None
    reason: str = ""

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None


def _default_weight() -> QuantizerSpec:
    return QuantizerSpec(bits=8, signed=True, symmetric=True, per_channel=True, narrow_range=True)


def _default_act() -> QuantizerSpec:
    return QuantizerSpec(bits=8, signed=None, symmetric=False)


class QuantConfig(BaseModel):
    """Whole-model quantization config; see the module docstring for rule precedence."""

    model_config = ConfigDict(extra="forbid")

    weight: QuantizerSpec | None = Field(default_factory=_default_weight)
    act: QuantizerSpec | None = Field(default_factory=_default_act)
    first_layer: EdgePolicy = EdgePolicy.INT8
    last_layer: EdgePolicy = EdgePolicy.INT8
    fold_bn: bool = True
    layers: list[LayerRule] = Field(default_factory=list)

    @classmethod
    def uniform(
        cls,
        w_bits: int = 8,
        a_bits: int | None = 8,
        *,
        kind: str = "uniform",
        observer: str = "minmax",
        per_channel: bool = True,
        first_last: EdgePolicy | str = EdgePolicy.INT8,
        dw_act_per_channel: bool = False,
        dw_weight_bits: int | None = None,
        narrow_weights: bool = True,
        **kwargs: Any,
    ) -> QuantConfig:
        """The common case: one bitwidth for weights, one for activations.

        ``dw_act_per_channel`` gives the inputs of depthwise convs one scale per channel. Each
        output channel of a depthwise conv reads one input channel, so the input scale folds
        into that channel's weight scale and output requantization, as per-channel weight
        scales do: integer hardware runs it when the producer of that input (a conv, as in
        MobileNetV2 and EfficientNet) requantizes per channel. It rescues channels whose range is
        a small fraction of the tensor's, which one low-bit scale rounds to zero.

        ``dw_weight_bits`` gives the weights of depthwise convs their own bits. Their 3x3
        kernels are a few percent of a MobileNet's weights but, with nine weights per output
        channel, the layers that 4 bits hurt most; 8 costs little size.

        ``narrow_weights`` (default) keeps weight codes symmetric, ``[-(2^(b-1)-1), 2^(b-1)-1]``,
        as int8 kernels expect; ``False`` uses all ``2^b`` codes, ``[-2^(b-1), 2^(b-1)-1]``. At
        2 bits that is the difference between ternary weights ``{-1, 0, 1}`` and four levels
        ``{-2, -1, 0, 1}`` (LSQ's and BRECQ's 2-bit grids have four).
        """
        weight = validate_model(
            QuantizerSpec,
            dict(kind=kind, bits=w_bits, signed=True, symmetric=True, per_channel=per_channel,
                 narrow_range=narrow_weights, observer=observer),
            "weight",
        )
        act = None
        if a_bits is not None:
            act = validate_model(
                QuantizerSpec,
                dict(kind=kind, bits=a_bits, signed=None, symmetric=kind != "uniform",
                     observer=observer),
                "act",
            )
        policy = EdgePolicy(first_last)
        if dw_act_per_channel and act is not None:
            rule = {"match": f"type:{DEPTHWISE}", "act": {"per_channel": True, "ch_axis": 1}}
            kwargs["layers"] = [rule, *kwargs.get("layers", [])]
        if dw_weight_bits is not None:
            rule = {"match": f"type:{DEPTHWISE}", "w_bits": dw_weight_bits}
            kwargs["layers"] = [rule, *kwargs.get("layers", [])]
        return validate_model(
            cls, dict(weight=weight, act=act, first_layer=policy, last_layer=policy, **kwargs),
            "config",
        )

    def resolve(self, layers: list[tuple[str, str]]) -> dict[str, LayerPlan]:
        """Plan for every ``(name, type_name)`` in execution order."""
        if not layers:
            return {}
        for rule in self.layers:
            if rule.specificity == 3 and rule.match not in {n for n, _ in layers}:
                names = ", ".join(n for n, _ in layers[:6])
                raise ConfigError(
                    f"config rule names layer {rule.match!r}, which is not a quantizable layer "
                    f"of this model (first layers: {names}, ...); run 'lowbit info' to list them"
                )
        first, last = layers[0][0], layers[-1][0]
        ordered = sorted(enumerate(self.layers), key=lambda t: (t[1].specificity, t[0]))
        plans = {}
        for name, type_name in layers:
            plan = LayerPlan(self.weight, self.act, "default")
            for rule in (r for _, r in ordered if r.specificity < 2):
                if rule.matches(name, type_name):
                    plan = self._apply(plan, rule)
            for is_edge, policy, label in ((name == first, self.first_layer, "first"),
                                           (name == last, self.last_layer, "last")):
                if is_edge and policy is EdgePolicy.FLOAT:
                    plan = LayerPlan(None, None, f"{label} layer kept in float (policy)")
                elif is_edge and policy is EdgePolicy.INT8:
                    plan = LayerPlan(
                        plan.weight.merged(None, 8) if plan.weight else None,
                        plan.act.merged(None, 8) if plan.act else None,
                        f"{label} layer at 8 bits (policy)",
                    )
            for rule in (r for _, r in ordered if r.specificity == 3):
                if rule.matches(name, type_name):
                    plan = self._apply(plan, rule)
            plans[name] = plan
        return plans

    def _apply(self, plan: LayerPlan, rule: LayerRule) -> LayerPlan:
        if rule.keep_float:
            return LayerPlan(None, None, f"kept in float by rule {rule.match!r}")
        weight = plan.weight or self.weight or _default_weight()
        act = plan.act or self.act
        new_w = weight.merged(rule.weight, rule.w_bits)
        new_a = act.merged(rule.act, rule.a_bits) if act is not None else None
        if act is None and (rule.a_bits is not None or rule.act):
            new_a = _default_act().merged(rule.act, rule.a_bits)
        return LayerPlan(new_w, new_a, f"rule {rule.match!r}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
        return write_yaml_or_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        return load_yaml_model(cls, path, "config file")


def write_yaml_or_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
    path = Path(path)
    text = (yaml.safe_dump(data, sort_keys=False) if path.suffix in {".yaml", ".yml"}
            else json.dumps(data, indent=2))
    atomic_write_text(path, text)
    return path


def read_yaml_mapping(path: str | Path, what: str, hint: str = "") -> dict[str, Any]:
    """The mapping a YAML/JSON file holds; every failure is a :class:`ConfigError` naming the
    file (``what`` says what the file is, ``hint`` where to find good ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_yaml_model(model: type[BaseModel], path: str | Path, what: str, hint: str = ""):
    """Read a YAML/JSON file into a pydantic ``model`` (errors as :func:`read_yaml_mapping`)."""
    return validate_model(model, read_yaml_mapping(path, what, hint), f"{what} {path}")


def validation_message(e: ValidationError, where: str) -> str:
    """One paragraph naming ``where`` and each field pydantic refused, with the reason."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: "
        f"{err['msg'].removeprefix('Value error, ')}"
        for err in e.errors()
    )
    return f"invalid {where}: {problems}"


def validate_model(model: type[BaseModel], data: dict[str, Any], where: str):
    """Validate with pydantic, re-raising as a one-paragraph :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e, where)) from None


