"""The ``tune`` flow's search space: which training hyperparameters a trial draws, and from where.

``SearchSpace`` is a frozen section of ranges (``<field>_low`` / ``<field>_high``; equal ends fix a field)
and comma-separated choices (epochs, batch sizes). A scenario's defaults come from its
``ScenarioDefaults``: ranges around its recommended values (``space_defaults``), then whatever its
``search_space`` mapping sets. ``suggest`` draws one trial's values as dotted overrides
(``training.learning_rate`` ...) that ``FinetuneConfig.for_scenario`` takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from pydantic import Field, field_validator, model_validator

from finetune_flows.plugins import SCENARIOS
from finetune_flows.tasks.core.sections import _Frozen

if TYPE_CHECKING:
    import optuna

RANGES = ("learning_rate", "warmup_ratio", "weight_decay", "layer_lr_decay", "label_smoothing")
"""Searched as a float range; the learning rate on a log scale."""


def parse_choices(text: str, kind: type[int] | type[float], low: float, high: float) -> list[Any]:
    """``"16, 32"`` -> ``[16, 32]``, each checked against [low, high]; a ValueError names the bad value."""
    values: list[Any] = []
    for part in text.split(","):
        try:
            value = kind(part.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated {kind.__name__} values, got {part.strip()!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside [{low:g}, {high:g}]")
        if value not in values:
            values.append(value)
    return values


class SearchSpace(_Frozen):
    """The hyperparameters each trial draws (TPE sampler). A range with equal ends fixes that value."""

    learning_rate_low: float = Field(default=1e-5, gt=0.0, le=1.0, description="Lowest peak learning rate (log).")
    learning_rate_high: float = Field(default=2e-4, gt=0.0, le=1.0, description="Highest peak learning rate (log).")
    epochs: str = Field(
        default="1,2,3", max_length=200, description="Epoch counts to choose from, comma-separated (e.g. '1,2,3')."
    )
    batch_sizes: str = Field(
        default="16,32", max_length=200, description="Training batch sizes to choose from, comma-separated."
    )
    warmup_ratio_low: float = Field(default=0.0, ge=0.0, lt=1.0, description="Lowest share of warmup steps.")
    warmup_ratio_high: float = Field(default=0.1, ge=0.0, lt=1.0, description="Highest share of warmup steps.")
    weight_decay_low: float = Field(default=0.0, ge=0.0, le=1.0, description="Lowest AdamW weight decay.")
    weight_decay_high: float = Field(default=0.1, ge=0.0, le=1.0, description="Highest AdamW weight decay.")
    layer_lr_decay_low: float = Field(default=1.0, ge=0.1, le=1.0, description="Lowest layer-wise LR decay.")
    layer_lr_decay_high: float = Field(default=1.0, ge=0.1, le=1.0, description="Highest layer-wise LR decay.")
    label_smoothing_low: float = Field(default=0.0, ge=0.0, lt=1.0, description="Lowest label smoothing.")
    label_smoothing_high: float = Field(default=0.0, ge=0.0, lt=1.0, description="Highest label smoothing.")

    @field_validator("epochs")
    @classmethod
    def _epoch_choices(cls, value: str) -> str:
        return ",".join(f"{e:g}" for e in parse_choices(value, float, 1e-6, 100.0))

    @field_validator("batch_sizes")
    @classmethod
    def _batch_choices(cls, value: str) -> str:
        return ",".join(str(b) for b in parse_choices(value, int, 1, 4096))

    @model_validator(mode="after")
    def _ordered_ranges(self) -> Self:
        problems = [
            f"{name}_low ({getattr(self, f'{name}_low'):g}) is above {name}_high ({getattr(self, f'{name}_high'):g})"
            for name in RANGES
            if getattr(self, f"{name}_low") > getattr(self, f"{name}_high")
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def ranges(self) -> dict[str, tuple[float, float]]:
        """(low, high) of each range, by training field."""
        return {name: (getattr(self, f"{name}_low"), getattr(self, f"{name}_high")) for name in RANGES}

    def choices(self) -> dict[str, list[Any]]:
        """The choices of each categorical, by training field."""
        return {
            "epochs": parse_choices(self.epochs, float, 1e-6, 100.0),
            "batch_size": parse_choices(self.batch_sizes, int, 1, 4096),
        }

    def searched(self) -> list[str]:
        """The training fields that vary between trials (the others are fixed by the space)."""
        varying = [name for name, (low, high) in self.ranges().items() if low < high]
        return varying + [name for name, values in self.choices().items() if len(values) > 1]


def space_defaults(scenario: str) -> dict[str, Any]:
    """``scenario``'s search space as field values: ranges around its recommended training values, then its own
    ``ScenarioDefaults.search_space``. Its epochs stay fixed (early stopping decides when to stop)."""
    d = SCENARIOS.get(scenario).defaults
    derived: dict[str, Any] = {
        "learning_rate_low": d.learning_rate / 4,
        "learning_rate_high": min(d.learning_rate * 4, 1.0),
        "epochs": f"{d.epochs:g}",
        "batch_sizes": ",".join(str(b) for b in sorted({max(1, d.batch_size // 2), d.batch_size})),
        "warmup_ratio_low": 0.0,
        "warmup_ratio_high": min(max(0.1, 2 * d.warmup_ratio), 0.5),
        "weight_decay_low": 0.0,
        "weight_decay_high": max(0.1, d.weight_decay),
        "layer_lr_decay_low": d.layer_lr_decay,
        "layer_lr_decay_high": 1.0,
        "label_smoothing_low": 0.0,
        "label_smoothing_high": d.label_smoothing,
    }
    return {**derived, **d.search_space}


def suggest(trial: optuna.trial.Trial, space: SearchSpace) -> dict[str, Any]:
    """One trial's training values as dotted overrides (``{"training.learning_rate": 3e-5, ...}``): drawn where the
    space varies, fixed where it does not (a fixed value is not an Optuna parameter)."""
    values: dict[str, Any] = {}
    for name, (low, high) in space.ranges().items():
        values[name] = trial.suggest_float(name, low, high, log=name == "learning_rate") if low < high else low
    for name, options in space.choices().items():
        values[name] = trial.suggest_categorical(name, options) if len(options) > 1 else options[0]
    return {f"training.{name}": value for name, value in values.items()}
