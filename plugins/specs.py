"""The protocols a plugin satisfies: ``TaskHead`` (what the network predicts) and ``Scenario``
(a domain: its data layouts, label names, metric and defaults).

A plugin is a class registered under an entry point; the registry instantiates it without
arguments and checks it against these protocols (attributes, methods and ``api_version``).
Plugins must not import torch at module import time: listing plugins imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


class LabelKind(StrEnum):
    """How a head reads the label column."""

    CATEGORICAL = "categorical"
    NUMERIC = "numeric"
    RANKING = "ranking"
    """(query text, item text) pairs that were liked; every other item is a negative."""


@dataclass(frozen=True)
class DataLayout:
    """A file layout a scenario knows: which column holds the text and which the label."""

    name: str
    text_column: str
    label_column: str
    description: str = ""


@dataclass(frozen=True)
class ScenarioDefaults:
    """Hyperparameters a scenario recommends; the flow's config starts from these."""

    model: str = "minilm"
    max_length: int = 128
    learning_rate: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    layer_lr_decay: float = 1.0
    label_smoothing: float = 0.0
    eval_every_steps: int = 200
    early_stopping_patience: int = 3
    eval_fraction: float = 0.1
    test_fraction: float = 0.0
    parity_tolerance: float = 1e-4
    """The ONNX parity gate's largest allowed |output difference| (``export.tolerance``)."""
    search_space: dict[str, Any] = field(default_factory=dict)
    """The ``tune`` flow's search space for this scenario: ``SearchSpace`` field -> value (e.g.
    ``{"learning_rate_high": 3e-4}``); fields left out are derived from the values above."""


class StageHook(StrEnum):
    """Where in the one pipeline a scenario's extra stage runs."""

    PREPARE = "prepare"
    """Instead of the generic labelled-text ingest: reads the scenario's data into the prepared dataset
    (``finetune_flows.tasks.core.stages.PreparedData``) that tokenization, training and evaluation read."""
    BEFORE_REGISTER = "before-register"
    """After export and evaluation: adds metrics, version tags and files shipped with the served model
    (``finetune_flows.tasks.core.stages.StageOutput``)."""


@dataclass(frozen=True)
class ExtraStage:
    """A stage a scenario adds to the pipeline: a function ``target`` ("module:function"), imported when it runs.

    The function takes a ``finetune_flows.tasks.core.stages.StageContext`` and returns what its hook
    expects; it runs as a Prefect task called ``name``.
    """

    name: str
    hook: StageHook
    target: str
    description: str = ""


@dataclass(frozen=True)
class SampleData:
    """Files bundled with a scenario so that its demo runs on a fresh clone."""

    train: Path
    eval: Path | None = None
    attribution: str = ""


@runtime_checkable
class TaskHead(Protocol):
    """What the fine-tuned network predicts, and how it is built and read out."""

    api_version: ClassVar[int]
    name: ClassVar[str]
    description: ClassVar[str]
    label_kind: ClassVar[LabelKind]
    text_columns: ClassVar[tuple[str, ...]]
    """Text columns of the prepared dataset the head reads: ("text",) for a classifier, ("query", "item") for pairs."""
    evaluator: ClassVar[str]
    """"module:Class" of its evaluation (``finetune_flows.tasks.core.evaluating.Evaluator``), imported when used."""
    serving_entry: ClassVar[str]
    """Module of the MLflow models-from-code file a registered version of this head runs."""
    export_output: ClassVar[str]
    """Name of the exported graph's one output: "logits" (classifier) or "embedding" (bi-encoder)."""

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """Load the pretrained encoder at ``source`` (a local folder) with this head on top."""
        ...

    def tokenize(self, tokenizer: Any, batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
        """Features of a batch of prepared rows, for ``datasets.map(batched=True)``: token ids (unpadded), labels."""
        ...

    def collator(self, tokenizer: Any) -> Any:
        """Builds a training batch from a list of features, padding each to the longest in the batch."""
        ...

    def trainer_options(self) -> dict[str, Any]:
        """``TrainingArguments`` this head sets differently from the pipeline's (e.g. no eval, drop_last)."""
        ...

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        """Write the trained model to ``out_dir`` as a folder that ``build_model`` and ``export_module`` load."""
        ...

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Turn raw outputs of shape (batch, n_outputs) into (predicted ids, probabilities)."""
        ...

    def export_module(self, model_dir: Path) -> Any:
        """The trained model at ``model_dir`` as an eval-mode ``torch.nn.Module`` with
        ``forward(input_ids, attention_mask, token_type_ids=None) -> Tensor`` (the ``export_output``).

        It is what is traced to ONNX and what the parity gate compares the graph with, so it must
        compute its output with the head's own code (for the bi-encoder: its own pooling).
        """
        ...

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """ONNX metadata the served model reads (classifier: ``id2label``; bi-encoder: ``score_scale``...)."""
        ...


@runtime_checkable
class Scenario(Protocol):
    """A domain: what data looks like, what labels mean, which metric decides, which defaults."""

    api_version: ClassVar[int]
    name: ClassVar[str]
    description: ClassVar[str]
    head: ClassVar[str]
    layouts: ClassVar[tuple[DataLayout, ...]]
    label_names: ClassVar[dict[str, str]]
    primary_metric: ClassVar[str]
    defaults: ClassVar[ScenarioDefaults]
    extra_stages: ClassVar[tuple[ExtraStage, ...]]
    """Stages this scenario adds to the one pipeline (see ``StageHook``); empty for most."""

    def sample(self) -> SampleData | None:
        """The bundled demo data, or None when the scenario ships none."""
        ...

    def read_file(self, path: Path) -> pd.DataFrame | None:
        """Read a file in a scenario-specific format, or return None to use the generic readers."""
        ...

    def taxonomy(self) -> Path | None:
        """A topic taxonomy (JSON) to assign topics by embedding similarity, or None for no topics."""
        ...


class ScenarioBase:
    """Convenience base with the optional parts of ``Scenario`` filled in."""

    layouts: ClassVar[tuple[DataLayout, ...]] = (DataLayout("generic", "text", "label"),)
    label_names: ClassVar[dict[str, str]] = {}
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults()
    extra_stages: ClassVar[tuple[ExtraStage, ...]] = ()

    def sample(self) -> SampleData | None:
        return None

    def read_file(self, path: Path) -> pd.DataFrame | None:
        return None

    def taxonomy(self) -> Path | None:
        return None

    def answer_templates(self) -> Path | None:
        """Optional, not part of ``Scenario``: a CSV (``intent,reply,link``) with a reply per label, which the
        ``finetune_flows.tasks.classification.answers:ship_answer_templates`` stage checks and ships with the
        served model; None: no templates."""
        return None
