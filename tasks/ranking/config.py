"""The typed parameter models of the recommendation flows (``finetune-recommender``, ``recommend``).

Shallow, described and bounded like ``tasks.core.config.FinetuneConfig``, whose model, registration
and export sections they reuse; ``RecommenderConfig.for_scenario`` applies ``key=value`` overrides.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune_flows.plugins import SCENARIOS, ConfigError
from finetune_flows.plugins.specs import LabelKind
from finetune_flows.tasks.core.config import (
    ExportConfig,
    ModelConfig,
    Precision,
    RegistrationConfig,
    known_scenario,
    scenario_defaults,
    set_dotted,
    validated,
)
from finetune_flows.tasks.ranking.split import SplitOptions


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InteractionDataConfig(_Frozen):
    """Which interaction log to learn from and how it becomes a ranking task."""

    path: str | None = Field(
        default=None,
        description="Folder with ratings.csv + movies.csv (+ tags.csv), or interactions.csv + items.csv. "
        "Empty: the bundled MovieLens sample.",
    )
    positive_threshold: float = Field(default=4.0, ge=-1e9, le=1e9, description="Ratings at or above are positives.")
    min_positives: int = Field(default=3, ge=3, le=1000, description="Positives a user needs to be evaluated.")
    negatives: int = Field(default=99, ge=1, le=10_000, description="Never-rated items ranked against each target.")
    profile_items: int = Field(default=10, ge=1, le=200, description="Recent positives written into a profile.")
    pairs_per_user: int = Field(default=8, ge=1, le=10_000, description="Training pairs per user (most recent).")
    max_tags: int = Field(default=5, ge=0, le=50, description="Most frequent tags added to an item's text.")


class PairTrainingConfig(_Frozen):
    """Fine-tuning the shared encoder on (profile, liked item) pairs with in-batch negatives."""

    epochs: float = Field(default=1.0, gt=0.0, le=100.0, description="Passes over the training pairs.")
    max_steps: int = Field(default=-1, ge=-1, le=10_000_000, description="Stop after this many steps; -1: no cap.")
    batch_size: int = Field(
        default=32, ge=2, le=4096, description="Pairs per step (each batch's other items are negatives)."
    )
    learning_rate: float = Field(default=5e-5, gt=0.0, le=1.0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of steps of linear warmup.")
    precision: Precision = Field(default=Precision.AUTO, description="auto: bf16 where the hardware runs it fast.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for negatives, batches and init.")


class BaselineConfig(_Frozen):
    """The collaborative-filtering baselines computed in the same run."""

    mf_factors: int = Field(default=32, ge=2, le=1024, description="BPR matrix-factorisation factors.")
    mf_epochs: int = Field(default=40, ge=1, le=1000, description="BPR epochs over the training positives.")


class RecommenderConfig(_Frozen):
    """Fine-tune a text recommender, rank it against baselines, export its encoder and register it."""

    scenario: str = Field(default="recommendation", description="A scenario whose head ranks (see `plugins`).")
    data: InteractionDataConfig = Field(default_factory=InteractionDataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: PairTrainingConfig = Field(default_factory=PairTrainingConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("scenario")
    @classmethod
    def _ranking_scenario(cls, value: str) -> str:
        from finetune_flows.plugins import HEADS

        head = SCENARIOS.get(known_scenario(value)).head
        if HEADS.get(head).label_kind is not LabelKind.RANKING:
            raise ValueError(f"scenario {value!r} uses head {head!r}, which does not rank; use the finetune flow")
        return value

    @model_validator(mode="before")
    @classmethod
    def _scenario_defaults(cls, data: Any) -> Any:
        """Model and training fields left out take the scenario's defaults."""
        if not isinstance(data, dict) or data.get("scenario", "recommendation") not in SCENARIOS.names():
            return data
        defaults = scenario_defaults(data.get("scenario", "recommendation"))
        defaults["training"] = {k: v for k, v in defaults["training"].items() if k in PairTrainingConfig.model_fields}
        merged = dict(data)
        for section in ("model", "training"):
            given = merged.get(section, {})
            if isinstance(given, dict):
                merged[section] = {**defaults[section], **given}
        return merged

    @property
    def head_name(self) -> str:
        return SCENARIOS.get(self.scenario).head

    @property
    def model_name(self) -> str:
        return self.registration.model_name or self.scenario

    @property
    def experiment_name(self) -> str:
        return self.registration.experiment or f"finetune-{self.scenario}"

    def split_options(self) -> SplitOptions:
        d = self.data
        return SplitOptions(
            positive_threshold=d.positive_threshold,
            min_positives=d.min_positives,
            negatives=d.negatives,
            profile_items=d.profile_items,
            pairs_per_user=d.pairs_per_user,
            seed=self.training.seed,
        )

    @classmethod
    def for_scenario(cls, scenario: str, overrides: dict[str, Any] | None = None) -> RecommenderConfig:
        """The defaults, then ``overrides`` (dotted keys, e.g. ``training.epochs``)."""
        if "scenario" in (overrides or {}):
            raise ConfigError("choose the scenario by name, not with an override")
        values: dict[str, Any] = {"scenario": scenario}
        for key, value in (overrides or {}).items():
            set_dotted(values, key, value)
        return validated(cls, values)
