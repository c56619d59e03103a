"""The sections of the flows' parameter models: data, model, training, infrastructure, ranking, evaluation,
registration, export. Each is a frozen pydantic model with described and bounded fields; Prefect renders them
as the groups of the run form.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune_flows.tasks.core.overrides import format_label_map, parse_label_map

MINILM = "minilm"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


class KeepCheckpoints(StrEnum):
    """Which training checkpoints stay in the run folder once training succeeded (the trained model is kept apart).

    ``model_only`` rather than "none": ``--set key=none`` means an empty value."""

    BEST_AND_LAST = "best_and_last"
    ALL = "all"
    MODEL_ONLY = "model_only"


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
        description=(
            "Share of training rows held out as a test split when no test file is given; 0: none. A scenario's "
            "preset applies only when neither an eval nor a test file is given; a value you set always applies."
        ),
    )
    select_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description=(
            "Share of the training rows (after eval and test are held out) carved as a selection split, stratified "
            "and seeded: it chooses the checkpoint and stops training early, so eval stays held out; 0: eval does."
        ),
    )
    max_train_rows: int | None = Field(
        default=None, ge=10, le=10_000_000, description="Use only this many training rows (seeded sample)."
    )
    label_map: str | None = Field(
        default=None,
        max_length=10_000,
        description=(
            "Raw label values -> the scenario's label names, e.g. '0:negative,1:positive,2:neutral'. Values not "
            "listed must be labels the scenario knows."
        ),
    )
    label_map_path: str | None = Field(
        default=None,
        description="The label map as a file: a CSV with a header and two columns (raw, label) or a JSON object.",
    )
    max_file_mb: float = Field(
        default=2048.0,
        gt=0.0,
        le=1_000_000.0,
        description=(
            "Largest input file in MB (on disk, checked before it is read; a .gz file also decompressed): a bigger "
            "one is an error naming it."
        ),
    )
    max_rows: int = Field(
        default=5_000_000, ge=1, le=1_000_000_000, description="Most data rows one input file may hold."
    )
    max_text_bytes: int = Field(
        default=100_000,
        ge=16,
        le=1_000_000_000,
        description=(
            "Most UTF-8 bytes in one text cell; a longer text is an error naming file, row and column (texts are "
            "truncated to model.max_length tokens anyway, and a huge cell exhausts memory in tokenization)."
        ),
    )
    max_imbalance_ratio: float = Field(
        default=20.0,
        ge=1.0,
        le=1e9,
        description=(
            "Warn (log and run tag class_imbalance) when the largest class has more than this many times the "
            "training rows of the smallest; not an error."
        ),
    )
    held_out_labels: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Labels (chosen with the seed) left out of training; their eval and test rows measure out-of-scope "
        "hand-off (the model will not know them: for measuring). 0: none.",
    )
    out_of_scope_label: str | None = Field(
        default=None,
        max_length=200,
        description="Raw label value of out-of-scope rows (e.g. 'oos'): never trained on; their eval and test rows "
        "measure the hand-off. Empty: none.",
    )

    @field_validator("label_map")
    @classmethod
    def _label_pairs(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return format_label_map(parse_label_map(value))

    @model_validator(mode="after")
    def _one_label_map(self) -> Self:
        if self.label_map and self.label_map_path:
            raise ValueError("give data.label_map or data.label_map_path, not both")
        return self


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
    keep_checkpoints: KeepCheckpoints = Field(
        default=KeepCheckpoints.BEST_AND_LAST,
        description=(
            "Checkpoints left in the run folder after training succeeds: best_and_last, all, or model_only (none; "
            "the trained model is kept in any case)."
        ),
    )


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
    handoff_precision: float = Field(
        default=0.95,
        gt=0.5,
        lt=1.0,
        description="Scenarios with a hand-off stage: the accuracy the answered messages must reach on eval; "
        "below the confidence threshold that gives it, the served model answers 'handoff'.",
    )
    handoff_out_of_scope_recall: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Instead: the share of eval's out-of-scope messages (data.out_of_scope_label or "
        "data.held_out_labels) the hand-off must catch. Empty: choose by handoff_precision.",
    )


class RegistrationConfig(_Frozen):
    """Where the model goes in MLflow and when it becomes champion."""

    model_name: str | None = Field(
        default=None,
        max_length=200,
        description="Registered model name: letters, digits, '-', '_' and '.' (no '..'). Empty: the scenario's name.",
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

    @field_validator("model_name")
    @classmethod
    def _registry_safe_name(cls, value: str | None) -> str | None:
        """A name MLflow's registry and its artifact paths take as one plain segment (checked before anything runs)."""
        if value and (not MODEL_NAME.fullmatch(value) or ".." in value):
            raise ValueError(
                "a registered model name may hold only letters, digits, '-', '_' and '.', start with a letter or "
                f"digit, and not contain '..'; got {value!r}"
            )
        return value


class ServedGraph(StrEnum):
    """Which exported graph the registered model serves."""

    FASTEST = "fastest"
    FP32 = "fp32"


class ExportConfig(_Frozen):
    """ONNX export, its parity gate, and the ladder of faster variants (fused, int8) gated against fp32."""

    parity_samples: int = Field(default=256, ge=256, le=100_000, description="Eval texts in the parity check.")
    tolerance: float = Field(default=1e-4, gt=0.0, le=1e-2, description="Largest allowed |logit difference|.")
    opset: int = Field(default=18, ge=14, le=23, description="ONNX opset version.")
    served: ServedGraph = Field(
        default=ServedGraph.FASTEST,
        description="fastest: build fused and int8 variants, serve the fastest at batch 64 that passes the gate; "
        "fp32: serve the parity-checked fp32 graph and build nothing else.",
    )
    min_agreement: float = Field(
        default=0.99, ge=0.5, le=1.0, description="Gate: least share of eval texts predicted as fp32 predicts them."
    )
    min_cosine: float = Field(
        default=0.99, ge=0.5, le=1.0, description="Gate for embedding graphs: least mean cosine to fp32's embeddings."
    )
    max_metric_loss: float = Field(
        default=0.003, ge=0.0, le=0.1, description="Gate: largest primary-metric loss against fp32 (0.003 = 0.3 pt)."
    )
    ladder_texts: int = Field(
        default=1000, ge=32, le=100_000, description="Eval texts each variant is compared with fp32 on."
    )
