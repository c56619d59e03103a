"""The typed parameter model of the ``finetune`` flow; Prefect renders it as the run form.

One frozen model with shallow sub-models (data, model, training, evaluation, registration,
export); every field is described and bounded, plugin names are checked against the registry.
``FinetuneConfig.for_scenario`` starts from a scenario's defaults and applies ``key=value``
overrides such as ``training.epochs=2``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune_flows.plugins import HEADS, SCENARIOS, ConfigError

MINILM = "minilm"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Precision(StrEnum):
    """Numeric precision of the training step."""

    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


class ClassWeighting(StrEnum):
    """How classes are weighted in the training loss."""

    NONE = "none"
    BALANCED = "balanced"


class DataConfig(_Frozen):
    """Which files to train and evaluate on, and how to read them."""

    train_path: str | None = Field(
        default=None,
        description="Training file (CSV, TSV, JSONL, Parquet; .gz too). Empty: the bundled sample.",
    )
    eval_path: str | None = Field(
        default=None, description="Evaluation file. Empty: a stratified, seeded split of the training file."
    )
    text_column: str | None = Field(
        default=None, description="Text column. Empty: the first of the scenario's known layouts that fits."
    )
    label_column: str | None = Field(default=None, description="Label column. Empty: as the layout says.")
    eval_fraction: float = Field(
        default=0.1, gt=0.0, lt=0.5, description="Share of training rows held out for eval when no eval file is given."
    )
    test_path: str | None = Field(
        default=None, description="Test file, reported only (never used for early stopping or promotion)."
    )
    test_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description="Share of training rows held out as a test split when no test file is given; 0: none.",
    )
    max_train_rows: int | None = Field(
        default=None, ge=10, le=10_000_000, description="Use only this many training rows (seeded sample)."
    )


class ModelConfig(_Frozen):
    """Where the pretrained encoder comes from."""

    source: str = Field(
        default=MINILM,
        min_length=1,
        max_length=500,
        description=(
            "'minilm' (the offline all-MiniLM-L6-v2), a local folder, a hub id such as "
            "'org/name', or a registered model 'models:/<name>@<alias>' to warm-start from."
        ),
    )
    max_length: int = Field(default=128, ge=8, le=512, description="Tokens kept per text (longer are truncated).")


class TrainingConfig(_Frozen):
    """The optimisation: HF Trainer with dynamic padding, length grouping and AdamW."""

    epochs: float = Field(default=1.0, gt=0.0, le=100.0, description="Passes over the training data.")
    max_steps: int = Field(default=-1, ge=-1, le=10_000_000, description="Stop after this many steps; -1: no cap.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Training examples per step.")
    learning_rate: float = Field(default=5e-5, gt=0.0, le=1.0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(default=0.06, ge=0.0, lt=1.0, description="Share of steps of linear warmup.")
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    layer_lr_decay: float = Field(
        default=1.0,
        ge=0.1,
        le=1.0,
        description=(
            "Layer-wise learning-rate decay: each encoder layer further from the output trains at this factor of the "
            "one above (embeddings least); 1: one rate for all."
        ),
    )
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Share of each target spread over the other classes (0: none)."
    )
    eval_every_steps: int = Field(
        default=200, ge=1, le=1_000_000, description="Evaluate (and checkpoint) every N steps."
    )
    early_stopping_patience: int = Field(
        default=3, ge=1, le=100, description="Stop after N evaluations without improvement of the metric."
    )
    precision: Precision = Field(
        default=Precision.AUTO, description="auto: bf16 autocast where the hardware runs it fast, else fp32."
    )
    class_weights: ClassWeighting = Field(
        default=ClassWeighting.NONE,
        description="balanced: weight each class's loss by n_rows / (n_classes * n_rows_of_class).",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for splits, sampling and init.")


class InfrastructureConfig(_Frozen):
    """Where and how the training stage runs: in this flow run, across processes, or on another work pool."""

    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Training processes (one per device) launched with torchrun; 1: train in the stage's own process.",
    )
    train_on: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^[^/]+/[^/]+$",
        description=(
            "Run the training stage as deployment '<flow>/<deployment>' (e.g. 'train/sentiment-train' on the gpu "
            "pool) and wait for it; empty: train in this flow run."
        ),
    )
    start_timeout_s: int = Field(
        default=900,
        ge=1,
        le=7 * 24 * 3600,
        description=(
            "With train_on: when no worker has picked up the handed-off run after this many seconds, cancel it "
            "and fail (a pool without a worker would otherwise keep this run waiting forever)."
        ),
    )


class RankingConfig(_Frozen):
    """How an interaction log becomes a ranking task, and the baselines it is compared with (ranking heads only)."""

    positive_threshold: float = Field(default=4.0, ge=-1e9, le=1e9, description="Ratings at or above are positives.")
    min_positives: int = Field(default=3, ge=3, le=1000, description="Positives a user needs to be evaluated.")
    negatives: int = Field(default=99, ge=1, le=10_000, description="Never-rated items ranked against each target.")
    profile_items: int = Field(default=10, ge=1, le=200, description="Recent positives written into a profile.")
    pairs_per_user: int = Field(default=8, ge=1, le=10_000, description="Training pairs per user (most recent).")
    max_tags: int = Field(default=5, ge=0, le=50, description="Most frequent tags added to an item's text.")
    mf_factors: int = Field(default=32, ge=2, le=1024, description="BPR matrix-factorisation factors (baseline).")
    mf_epochs: int = Field(default=40, ge=1, le=1000, description="BPR epochs over the training positives (baseline).")


class EvaluationConfig(_Frozen):
    """How the final model is measured."""

    calibration_bins: int = Field(default=15, ge=2, le=100, description="Bins of the expected calibration error.")
    batch_size: int = Field(default=128, ge=1, le=4096, description="Texts per evaluation batch.")


class RegistrationConfig(_Frozen):
    """Where the model goes in MLflow and when it becomes champion."""

    model_name: str | None = Field(
        default=None, max_length=200, description="Registered model name. Empty: the scenario's name."
    )
    experiment: str | None = Field(
        default=None, max_length=200, description="MLflow experiment. Empty: 'finetune-<scenario>'."
    )
    promotion_margin: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="The challenger becomes champion when its metric beats the champion's by more than this.",
    )
    idempotency_key: str | None = Field(
        default=None,
        max_length=500,
        description="If a version already carries this key (tag idempotency_key), it is returned instead of a new one.",
    )


class ExportConfig(_Frozen):
    """ONNX export and its parity gate."""

    parity_samples: int = Field(default=256, ge=256, le=100_000, description="Eval texts in the parity check.")
    tolerance: float = Field(default=1e-4, gt=0.0, le=1e-2, description="Largest allowed |logit difference|.")
    opset: int = Field(default=18, ge=14, le=23, description="ONNX opset version.")


class FinetuneConfig(_Frozen):
    """Fine-tune a text model for a scenario, evaluate it, export it to ONNX and register it."""

    scenario: str = Field(default="sentiment", description="Scenario plugin (see `finetune-flows plugins`).")
    head: str | None = Field(default=None, description="Head plugin. Empty: the scenario's head.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    infrastructure: InfrastructureConfig = Field(default_factory=InfrastructureConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)

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
        """Fields left out take the scenario's defaults (a deployment or API call may give only a few)."""
        if not isinstance(data, dict):
            return data
        scenario = data.get("scenario", "sentiment")
        if scenario not in SCENARIOS.names():
            return data  # the field validator reports it
        merged = dict(data)
        for section, defaults in scenario_defaults(scenario).items():
            given = merged.get(section, {})
            if isinstance(given, dict):
                merged[section] = {**defaults, **given}
        return merged

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


def known_scenario(value: str) -> str:
    """``value`` if a scenario plugin has that name; a ValueError listing the registered ones otherwise."""
    if value not in SCENARIOS.names():
        raise ValueError(f"unknown scenario {value!r}; registered scenarios: {SCENARIOS.names()}")
    return value


def scenario_defaults(scenario: str) -> dict[str, dict[str, Any]]:
    """A scenario's recommended values, by config section."""
    d = SCENARIOS.get(scenario).defaults
    return {
        "model": {"source": d.model, "max_length": d.max_length},
        "data": {"eval_fraction": d.eval_fraction, "test_fraction": d.test_fraction},
        "training": {
            "epochs": d.epochs,
            "batch_size": d.batch_size,
            "learning_rate": d.learning_rate,
            "warmup_ratio": d.warmup_ratio,
            "weight_decay": d.weight_decay,
            "layer_lr_decay": d.layer_lr_decay,
            "label_smoothing": d.label_smoothing,
            "eval_every_steps": d.eval_every_steps,
            "early_stopping_patience": d.early_stopping_patience,
        },
    }


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: dict[str, Any]) -> M:
    """``model`` built from ``values``; every problem reported at once as a ``ConfigError``."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["training.epochs=2", "data.eval_path=x.tsv"]`` -> a dict; values stay strings (pydantic converts)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = None if value.strip().lower() in {"", "none", "null"} else value.strip()
    return overrides
