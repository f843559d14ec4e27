"""Typed, serialisable configs of the PTQ methods: one pydantic class per method.

A method config says everything a PTQ run does besides the quantization config (bits, kinds,
layer rules): which method, and each of its options, all with their defaults written out, so
that the ``method_config`` saved in a results JSON reruns the same quantization
(``lowbit ptq --method-config results.json``). The class's ``method`` field names its
handler in :mod:`lowbit.ptq.registry`.

Runtime choices that do not change the result (progress bars) and ones that cannot be written
to a file (``block_types``, classes) are keyword arguments of :func:`lowbit.ptq.ptq`, not
fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import read_yaml_mapping, validate_model, validation_message, write_yaml_or_json
from ..errors import ConfigError
from ..quant.observers import OBSERVERS
from .pot_rescale import MODES as PAIR_MODES
from .reconstruct import ReconOptions

# Images per scale-adjustment step at every input size: fewer are faster at 224 px but broke
# MobileNetV2 W4A8 (docs/rapq.md, options).
QUICK_BATCH = 32
# Steps of rapq-quick's adjustment. Full rapq skips it by default: its exponent search refits
# each unit's exponents on the inputs the unit really gets, and the adjustment before it did
# not change the error after reconstruction (docs/rapq.md, "Quick mode").
QUICK_ITERS = 300


class MethodConfig(BaseModel):
    """Options every PTQ method takes. Subclasses fix ``method`` to their registered name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="the registered PTQ method this config runs")
    num_batches: int | None = Field(
        None, ge=1, description="read at most this many calibration batches (None: all of them)")
    bias_correction: bool = Field(
        False, description="last step: re-centre each quantized layer's output mean on the float "
        "model's (empirical bias correction, lowbit.ptq.bias_correction)")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(validation_message(e, f"{type(self).__name__} options")) from None

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain JSON values."""
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
        return write_yaml_or_json(self.to_dict(), path)


def _known_observer(v: str) -> str:
    if v not in OBSERVERS:
        raise ValueError(f"unknown observer {v!r}; choose one of {sorted(OBSERVERS)}")
    return v


Observer = Annotated[str, AfterValidator(_known_observer)]


class _RangeConfig(MethodConfig):
    """Range calibration: the observer named by ``method`` sets every weight and input range."""


class MinMaxConfig(_RangeConfig):
    """``minmax``: ranges from the smallest and largest calibration values."""

    method: Literal["minmax"] = "minmax"


class MseConfig(_RangeConfig):
    """``mse``: the range with the least squared quantization error on the calibration values."""

    method: Literal["mse"] = "mse"


class PercentileConfig(_RangeConfig):
    """``percentile``: ranges clipped at a percentile of the absolute calibration values."""

    method: Literal["percentile"] = "percentile"
    percentile: float | None = Field(
        None, gt=50.0, le=100.0, description="percentile of the weight and input defaults of "
        "the quantization config (None: the config's own, 99.99 unless it says otherwise)")


class _PotFields(MethodConfig):
    observer: Observer = Field(
        "mse", description="range observer of the first calibration; 'mse' also starts "
        "rapq-quick and rapq from the least-error exponent per channel (docs/rapq.md)")
    pot_rescale: str | None = Field(
        None, description="before the scale search, rescale each conv -> ReLU/ReLU6 -> "
        "depthwise conv pair so their power-of-two grids fit, the float model unchanged: "
        "'depthwise' (or True); None: off")

    @field_validator("pot_rescale", mode="before")
    @classmethod
    def _rescale(cls, v: Any) -> str | None:
        if v is True:
            return "depthwise"
        if v is False or v is None:
            return None
        if v == "all":
            raise ValueError(
                "pair rescaling mode 'all' (pairs into ordinary convs) was removed: it started "
                "RAPQ from a larger error than 'depthwise' (docs/notes/rapq.md); use 'depthwise'")
        if isinstance(v, str) and "streams" in v:
            raise ValueError(
                "rescaling of linear streams was removed (measured worse: "
                f"docs/notes/stream-rescaling.md); use one of {PAIR_MODES} or None")
        if v not in PAIR_MODES:
            raise ValueError(f"pot_rescale must be True, False, None or one of {PAIR_MODES}, "
                             f"got {v!r}")
        return v


class PotConfig(_PotFields):
    """``pot``: range calibration, each scale rounded to the nearest power of two (the naive
    baseline)."""

    method: Literal["pot"] = "pot"


class _QuickFields(_PotFields):
    quick_iters: int = Field(
        QUICK_ITERS, ge=0, description="steps of the network-wide adjustment of every "
        "power-of-two exponent at once; 0 keeps the starting (least-error) exponents")
    quick_batch_size: int = Field(
        QUICK_BATCH, ge=1, description="calibration images per adjustment step")
    seed: int = Field(0, description="seed of the batch sampling (adjustment and reconstruction)")


class RapqQuickConfig(_QuickFields):
    """``rapq-quick``: least-error starting exponents, then the network-wide adjustment."""

    method: Literal["rapq-quick"] = "rapq-quick"


def _default(name: str) -> Any:
    return ReconOptions.__dataclass_fields__[name].default


class _ReconFields(MethodConfig):
    """Block reconstruction's options; defaults are :class:`~lowbit.ptq.reconstruct.ReconOptions`'s."""

    RECON_KEYS: ClassVar[tuple[str, ...]] = (
        "iters", "batch_size", "lr_round", "lr_scale", "round_weight", "warmup", "beta",
        "bn_weight", "learn_w_scale", "learn_a_scale", "exponent_search", "diversify",
        "diversify_share", "diversify_steps", "chunk", "seed")
    POT: ClassVar[bool] = True

    iters: int = Field(
        _default("iters"), ge=0, description="reconstruction steps per unit; 0 runs each "
        "unit's exponent search alone, no learned rounding (power-of-two scales only)")
    batch_size: int = Field(_default("batch_size"), ge=1,
                            description="calibration images per reconstruction step")
    lr_round: float | None = Field(
        _default("lr_round"), gt=0, allow_inf_nan=False, description="Adam learning rate of "
        "AdaRound's rounding logits; None: min(0.1, 30 / iters) (docs/rapq.md)")
    lr_scale: float = Field(_default("lr_scale"), gt=0,
                            description="Adam learning rate of the learned log2 scales")
    round_weight: float = Field(_default("round_weight"), ge=0,
                                description="weight of AdaRound's rounding regulariser")
    warmup: float = Field(_default("warmup"), ge=0, le=1,
                          description="share of the steps before the rounding regulariser starts")
    beta: tuple[float, float] = Field(
        _default("beta"), description="the regulariser's temperature, annealed from the first "
        "to the second value")
    bn_weight: float = Field(_default("bn_weight"), ge=0,
                             description="weight of the BatchNorm-statistics term")
    bn_guided: bool | None = Field(
        None, description="BatchNorm-statistics term: None (auto) on when the model's BNs carry "
        "statistics; True requires them; False off")
    learn_w_scale: bool = Field(_default("learn_w_scale"),
                                description="learn weight scales by gradient")
    learn_a_scale: bool | None = Field(
        _default("learn_a_scale"), description="learn activation scales by gradient; None: for "
        "float scales (brecq), not for power-of-two ones")
    exponent_search: bool = Field(
        _default("exponent_search"), description="power of two: first pick each unit's "
        "exponents (and signed inputs' zero-points) among their neighbours")
    diversify: Literal["auto", "on", "off"] = Field(
        _default("diversify"), description="before reconstruction, push a share of the "
        "calibration images toward random classes of the float model (BN statistics matched "
        "where the model has them), so the rounding is not fitted to a few classes: 'auto' "
        "when the calibration set covers few classes, 'on', 'off' (docs/calibration.md)")
    diversify_share: float = Field(_default("diversify_share"), ge=0, le=1,
                                   description="share of the calibration images replaced")
    diversify_steps: int = Field(_default("diversify_steps"), ge=0,
                                 description="input-gradient steps per replaced image")
    chunk: int = Field(_default("chunk"), ge=1,
                       description="images per forward pass outside the optimisation steps")
    seed: int = Field(0, description="seed of the batch sampling")

    @model_validator(mode="after")
    def _consistent(self):
        self.recon_options().check(pot=self.POT)
        return self

    def recon_options(self, progress: bool = True, block_types=None) -> ReconOptions:
        """The reconstruction's runtime options for this config."""
        return ReconOptions(**{k: getattr(self, k) for k in self.RECON_KEYS},
                            progress=progress, block_types=block_types)


class RapqConfig(_QuickFields, _ReconFields):
    """``rapq``: least-error starting exponents, then BN-guided block reconstruction with each
    unit's exponent search; the network-wide adjustment first only with ``quick_iters > 0``."""

    method: Literal["rapq"] = "rapq"
    quick_iters: int = Field(
        0, ge=0, description="network-wide adjustment steps before the reconstruction (default "
        "0: the reconstruction's exponent search fits the exponents itself)")


class BrecqConfig(_ReconFields):
    """``brecq``: the same block reconstruction with float scales (a comparison)."""

    POT: ClassVar[bool] = False

    method: Literal["brecq"] = "brecq"
    observer: Observer = Field("mse", description="range observer of the first calibration")


def method_config_from_dict(classes: dict[str, type[MethodConfig]], data: dict[str, Any],
                            where: str = "method config") -> MethodConfig:
    """The config ``data`` describes (its ``method`` picks the class), as a :class:`ConfigError`
    naming ``where`` when it does not validate."""
    name = data.get("method")
    if name not in classes:
        raise ConfigError(f"{where}: 'method' must name a PTQ method, one of {sorted(classes)}; "
                          f"got {name!r}")
    return validate_model(classes[name], data, f"{where} ({name})")


def read_method_config(path: str | Path) -> dict[str, Any]:
    """The mapping of a method-config file: the file itself, or its ``method_config`` (a results
    JSON written by ``lowbit ptq -o``, a benchmark config under benchmarks/configs/)."""
    data = read_yaml_mapping(path, "method config")
    inner = data.get("method_config", data)
    if not isinstance(inner, dict):
        raise ConfigError(f"method config {path}: 'method_config' must be a mapping")
    return inner
