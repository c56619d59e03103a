"""The parameter model of the ``pretrain`` flow: where the unlabelled text comes from and how the MLM is trained.

One frozen model with shallow sections; ``corpus`` and ``training`` are its own, ``model``,
``infrastructure``, ``registration`` and ``export`` are the fine-tuning sections. Prefect renders it
as the run form; ``finetune-flows pretrain --set corpus.kind=file --set corpus.path=x.csv`` builds it
from dotted overrides.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import Field, field_validator, model_validator

from finetune_flows.tasks.core.overrides import known_scenario
from finetune_flows.tasks.core.sections import (
    ExportConfig,
    InfrastructureConfig,
    ModelConfig,
    Precision,
    RegistrationConfig,
    _Frozen,
)

MASKED_LM = "masked-lm"
"""What the run trains (its MLflow ``head`` tag): not a head plugin, the MLM head of ``mlm_head``."""


class CorpusKind(StrEnum):
    """Where the unlabelled text comes from."""

    FILE = "file"
    """A text column of any table file (CSV, TSV, JSONL, Parquet; .gz too)."""
    SCENARIO = "scenario"
    """The labelled texts of a scenario, labels dropped: its bundled sample, or ``corpus.path`` read its way."""
    MONITOR = "monitor"
    """The texts the monitor stored (``<state>/monitor/<model>/records.sqlite``, or ``corpus.path``)."""


class CorpusConfig(_Frozen):
    """The unlabelled text: which source, which column, how much is held back to measure the MLM loss."""

    kind: CorpusKind = Field(default=CorpusKind.SCENARIO, description="file, scenario or monitor.")
    path: str | None = Field(
        default=None,
        max_length=1000,
        description=(
            "file: the table (required). scenario: a file in the scenario's layout instead of its bundled sample. "
            "monitor: the store folder or its records.sqlite. Empty: the default of the kind."
        ),
    )
    text_column: str | None = Field(
        default=None,
        max_length=200,
        description="Text column. Empty: 'text' for a file, the scenario layout's text column for a scenario.",
    )
    monitor_model: str = Field(
        default="finance-monitoring",
        min_length=1,
        max_length=200,
        description="monitor: the monitored model whose store is read (<state>/monitor/<monitor_model>).",
    )
    held_back_fraction: float = Field(
        default=0.1, gt=0.0, lt=0.5, description="Share of distinct texts held back (seeded) to measure the MLM loss."
    )
    max_file_mb: float = Field(default=2048.0, gt=0.0, le=1_000_000.0, description="Largest input file in MB.")
    max_rows: int = Field(default=5_000_000, ge=1, le=1_000_000_000, description="Most rows one input may hold.")
    max_text_bytes: int = Field(
        default=100_000, ge=16, le=1_000_000_000, description="Most UTF-8 bytes in one text; more is an error."
    )

    @model_validator(mode="after")
    def _file_needs_a_path(self) -> Self:
        if self.kind is CorpusKind.FILE and not self.path:
            raise ValueError("corpus.kind=file needs corpus.path: a CSV, TSV, JSONL or Parquet file")
        return self


class MaskedLMTraining(_Frozen):
    """The MLM optimisation: HF Trainer, AdamW, masking of tokens or whole words."""

    epochs: float = Field(default=3.0, gt=0.0, le=1000.0, description="Passes over the training text.")
    max_steps: int = Field(default=-1, ge=-1, le=10_000_000, description="Stop after this many steps; -1: no cap.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Texts per step.")
    learning_rate: float = Field(default=5e-5, gt=0.0, le=1.0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(default=0.06, ge=0.0, lt=1.0, description="Share of steps of linear warmup.")
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    mlm_probability: float = Field(
        default=0.15, gt=0.0, lt=1.0, description="Share of tokens (or of words, with whole_word) masked per text."
    )
    whole_word: bool = Field(
        default=True, description="Mask every piece of a word together (whole-word masking); false: single tokens."
    )
    save_every_steps: int = Field(default=500, ge=1, le=1_000_000, description="Checkpoint every N steps.")
    precision: Precision = Field(
        default=Precision.AUTO, description="auto: bf16 autocast where the hardware runs it fast, else fp32."
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for the held-back split, masking and init.")


class PretrainConfig(_Frozen):
    """Continue masked-language-model training of the encoder on unlabelled text, and register the adapted encoder
    (fine-tune it with ``model.source=models:/<name>@champion``)."""

    scenario: str = Field(
        default="sentiment",
        description="Scenario whose texts are read (corpus.kind=scenario); names the run and the default model.",
    )
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: MaskedLMTraining = Field(default_factory=MaskedLMTraining)
    infrastructure: InfrastructureConfig = Field(default_factory=InfrastructureConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, value: str) -> str:
        return known_scenario(value)

    @property
    def head_name(self) -> str:
        return MASKED_LM

    @property
    def model_name(self) -> str:
        """The registered model: ``registration.model_name``, else ``<scenario>-encoder``."""
        return self.registration.model_name or f"{self.scenario}-encoder"

    @property
    def experiment_name(self) -> str:
        return self.registration.experiment or f"pretrain-{self.scenario}"
