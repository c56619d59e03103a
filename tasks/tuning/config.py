"""The ``tune`` flow's parameter model: one shallow, frozen ``TuneConfig`` (Prefect renders it as the run form).

The base run is a scenario plus ``key=value`` overrides, exactly as ``finetune-flows run --set`` takes them
(validated through ``FinetuneConfig.for_scenario``); the search space is a section whose fields left out take
the scenario's (``space_defaults``); the rest is the study: its name (a known name resumes it), the budget,
the seed and the pruning.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from finetune_flows.plugins import SCENARIOS, ConfigError
from finetune_flows.tasks.core.config import FinetuneConfig, known_scenario, parse_overrides
from finetune_flows.tasks.core.sections import _Frozen
from finetune_flows.tasks.tuning.space import SearchSpace, space_defaults

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Pruning(StrEnum):
    """When a trial stops early: at an evaluation whose metric is below what the rule allows."""

    MEDIAN = "median"
    """Below the median of the earlier trials at the same evaluation (after the warmup)."""
    THRESHOLD = "threshold"
    """Below ``prune_below``."""
    OFF = "off"


class TuneConfig(_Frozen):
    """Search a scenario's training hyperparameters with Optuna, then train, register and gate the best."""

    scenario: str = Field(default="sentiment", description="Scenario plugin (see `finetune-flows plugins`).")
    overrides: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="The base run's settings as key=value (as `run --set`), e.g. data.train_path=x.tsv; the "
        "searched training fields are drawn per trial on top of them.",
    )
    space: SearchSpace = Field(default_factory=SearchSpace, description="What each trial draws.")
    study_name: str | None = Field(
        default=None,
        max_length=200,
        description="Optuna study (letters, digits, '.', '_', '-'); an existing one is resumed: its finished "
        "trials count toward n_trials. Empty: a new study '<scenario>-<UTC time>-<random>'.",
    )
    n_trials: int = Field(
        default=10, ge=1, le=10_000, description="Finished (complete or pruned) trials the study should hold."
    )
    timeout_minutes: float | None = Field(
        default=None,
        gt=0.0,
        le=7 * 24 * 60.0,
        description="Start no new trial after this many minutes (a running one finishes; one trial always runs). "
        "Empty: no limit.",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed of the sampler and of every training run.")
    pruning: Pruning = Field(default=Pruning.MEDIAN, description="median, threshold or off.")
    pruning_warmup_evals: int = Field(
        default=2,
        ge=0,
        le=10_000,
        description="Median pruning: evaluations a trial gets before it may be pruned (early ones are noisy).",
    )
    pruning_startup_trials: int = Field(
        default=2, ge=0, le=10_000, description="Median pruning: trials that finish before any is pruned."
    )
    prune_below: float = Field(
        default=0.0, ge=-1e9, le=1e9, description="Threshold pruning: prune at an evaluation below this metric value."
    )
    register_best: bool = Field(
        default=True,
        description="Train the best trial's values as a normal finetune run (export, test report, registration, "
        "promotion gate). Off: only report them.",
    )

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, value: str) -> str:
        return known_scenario(value)

    @field_validator("study_name")
    @classmethod
    def _file_safe_name(cls, value: str | None) -> str | None:
        if value and not STUDY_NAME.fullmatch(value):
            raise ValueError(
                f"a study name may hold only letters, digits, '.', '_' and '-' and start with a letter or digit; "
                f"got {value!r}"
            )
        return value or None

    @model_validator(mode="before")
    @classmethod
    def _scenario_space(cls, data: Any) -> Any:
        """Space fields left out take the scenario's (``space_defaults``)."""
        if not isinstance(data, dict) or data.get("scenario", "sentiment") not in SCENARIOS.names():
            return data
        given = data.get("space", {})
        if isinstance(given, dict):
            return {**data, "space": {**space_defaults(data.get("scenario", "sentiment")), **given}}
        return data

    @model_validator(mode="after")
    def _valid_base(self) -> Self:
        if "training.seed" in self.base_overrides():
            raise ValueError("overrides: set the seed with the field seed, not training.seed")
        try:
            self.base_config()
        except ConfigError as exc:
            raise ValueError(f"overrides: {exc}") from exc
        return self

    def base_overrides(self) -> dict[str, Any]:
        """``overrides`` as a dict (values as given; pydantic converts them)."""
        return parse_overrides(self.overrides)

    def trial_config(self, drawn: dict[str, Any] | None = None) -> FinetuneConfig:
        """The fine-tune config of a trial: the scenario, the overrides, ``drawn`` (dotted keys) and the seed."""
        return FinetuneConfig.for_scenario(
            self.scenario, {**self.base_overrides(), **(drawn or {}), "training.seed": self.seed}
        )

    def base_config(self) -> FinetuneConfig:
        """The fine-tune config before any value is drawn (what data preparation and tokenization read)."""
        return self.trial_config()
