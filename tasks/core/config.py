"""The typed parameter models of the ``finetune`` and ``retrain`` flows; Prefect renders them as the run forms.

One frozen model with shallow sections (data, model, training, adapter, infrastructure, evaluation,
registration, export, ranking; see ``tasks.core.sections`` and ``tasks.core.adapters``); plugin names are
checked against the registry; fields left out take the scenario's defaults. ``FinetuneConfig.for_scenario``
applies ``key=value`` overrides such as ``training.epochs=2`` (``tasks.core.overrides``). ``RetrainConfig`` is
the fine-tune model plus the data folder and the schedule slot.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from finetune_flows.plugins import HEADS, SCENARIOS, ConfigError
from finetune_flows.tasks.core.adapters import AdapterConfig, TrainingMethod
from finetune_flows.tasks.core.overrides import (
    format_label_map,
    known_scenario,
    label_map_problem,
    parse_label_map,
    parse_overrides,
    scenario_defaults,
    set_dotted,
    validated,
)
from finetune_flows.tasks.core.sections import (
    MINILM,
    ClassWeighting,
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    InfrastructureConfig,
    KeepCheckpoints,
    ModelConfig,
    Precision,
    RankingConfig,
    RegistrationConfig,
    ServedGraph,
    TrainingConfig,
    _Frozen,
)

__all__ = [
    "MINILM",
    "AdapterConfig",
    "ClassWeighting",
    "DataConfig",
    "EvaluationConfig",
    "ExportConfig",
    "FinetuneConfig",
    "InfrastructureConfig",
    "KeepCheckpoints",
    "ModelConfig",
    "Precision",
    "RankingConfig",
    "RegistrationConfig",
    "RetrainConfig",
    "ServedGraph",
    "TrainingConfig",
    "TrainingMethod",
    "format_label_map",
    "known_scenario",
    "label_map_problem",
    "parse_label_map",
    "parse_overrides",
    "scenario_defaults",
    "set_dotted",
    "validated",
]


class FinetuneConfig(_Frozen):
    """Fine-tune a text model for a scenario, evaluate it, export it to ONNX and register it."""

    scenario: str = Field(default="sentiment", description="Scenario plugin (see `finetune-flows plugins`).")
    head: str | None = Field(default=None, description="Head plugin. Empty: the scenario's head.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    infrastructure: InfrastructureConfig = Field(default_factory=InfrastructureConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    resume: str | None = Field(
        default=None,
        description="Continue an interrupted run instead of starting one: its run folder name (under "
        "<state>/runs) or MLflow run id. The other fields must equal the run's own (`finetune-flows resume RUN` "
        "reads them from the run folder). Training continues from the last complete checkpoint.",
    )

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, value: str) -> str:
        return known_scenario(value)

    @field_validator("head")
    @classmethod
    def _known_head(cls, value: str | None) -> str | None:
        if value is not None and value not in HEADS.names():
            raise ValueError(f"unknown head {value!r}; registered heads: {HEADS.names()}")
        return value

    @property
    def head_name(self) -> str:
        return self.head or SCENARIOS.get(self.scenario).head

    @property
    def primary_metric(self) -> str:
        return SCENARIOS.get(self.scenario).primary_metric

    @property
    def model_name(self) -> str:
        return self.registration.model_name or self.scenario

    @property
    def experiment_name(self) -> str:
        return self.registration.experiment or f"finetune-{self.scenario}"

    @model_validator(mode="before")
    @classmethod
    def _scenario_defaults(cls, data: Any) -> Any:
        """Fields left out take the scenario's defaults (a deployment or API call may give only a few).

        The preset test split is the exception: with an eval or test file given, the user chose their
        held-out data, so ``data.test_fraction`` takes the preset only when they set it themselves.
        """
        if not isinstance(data, dict):
            return data
        scenario = data.get("scenario", "sentiment")
        if scenario not in SCENARIOS.names():
            return data  # the field validator reports it
        merged = dict(data)
        for section, defaults in scenario_defaults(scenario).items():
            given = merged.get(section, {})
            if isinstance(given, dict):
                if section == "data" and (given.get("eval_path") or given.get("test_path")):
                    defaults = {**defaults, "test_fraction": 0.0}
                merged[section] = {**defaults, **given}
        return merged

    @model_validator(mode="after")
    def _label_map_targets(self) -> Self:
        if self.data.label_map:
            problem = label_map_problem(parse_label_map(self.data.label_map), self.scenario)
            if problem:
                raise ValueError(f"data.label_map: {problem}")
        return self

    @classmethod
    def for_scenario(cls, scenario: str, overrides: dict[str, Any] | None = None) -> Self:
        """The scenario's defaults, then ``overrides`` (dotted keys, e.g. ``training.epochs``)."""
        if scenario not in SCENARIOS.names():
            raise ConfigError(f"unknown scenario {scenario!r}; registered scenarios: {SCENARIOS.names()}")
        if "scenario" in (overrides or {}):
            raise ConfigError("choose the scenario by name, not with an override: its defaults would not apply")
        values: dict[str, Any] = {"scenario": scenario}
        for key, value in (overrides or {}).items():
            set_dotted(values, key, value)
        return validated(cls, values)


class RetrainConfig(FinetuneConfig):
    """Retrain a scenario's model on a folder of labelled files, warm-starting from its champion; promote only on a
    frozen eval file. Every fine-tune field applies; ``model.source`` is the start of the first version (later ones
    start from the champion), ``data.eval_path`` is required (the frozen eval file) and the training file is the
    folder's files, concatenated."""

    data_folder: str = Field(
        min_length=1, description="Folder of labelled files (CSV, TSV, JSONL, Parquet; .gz too): all are trained on."
    )
    slot: str | None = Field(
        default=None,
        max_length=100,
        description="The schedule slot this run retrains for. Empty: the flow run's scheduled start time.",
    )

    @model_validator(mode="after")
    def _frozen_eval_file(self) -> Self:
        if not self.data.eval_path:
            raise ValueError(
                "data.eval_path: retraining needs a frozen eval file (challenger and champion are scored on it)"
            )
        if self.data.train_path:
            raise ValueError("data.train_path: retraining trains on data_folder; leave data.train_path empty")
        return self
