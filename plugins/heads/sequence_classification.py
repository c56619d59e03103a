"""Head ``sequence-classification``: one label per text, N classes taken from the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finetune_flows.plugins.heads import id2label_metadata, logits_module, softmax
from finetune_flows.plugins.specs import LabelKind


class SequenceClassificationHead:
    """A linear classifier over the encoder's pooled output, trained with cross-entropy."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "sequence-classification"
    description: ClassVar[str] = "Single-label classification into N classes taken from the data."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = "finetune_flows.tasks.classification.evaluation:ClassificationEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.classifier_model"
    export_output: ClassVar[str] = "logits"
    new_layers: ClassVar[tuple[str, ...]] = ("classifier",)
    """Modules built on top of the encoder, trained in full under a LoRA adapter (``adapter.train_modules``)."""

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """Load the encoder at ``source`` (a local folder) with a fresh or matching classifier."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(id2label),
            id2label=dict(id2label),
            label2id={label: index for index, label in id2label.items()},
            problem_type="single_label_classification",
            use_safetensors=True,
            trust_remote_code=False,
            # A warm start from a model with other labels gets a new classifier layer.
            ignore_mismatched_sizes=True,
        )

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arg-max ids and softmax probabilities (computed stably in float64)."""
        probs = softmax(logits)
        return probs.argmax(axis=-1), probs

    def export_module(self, model_dir: Path) -> Any:
        """The checkpoint at ``model_dir`` returning its logits: what is exported and checked."""
        return logits_module("AutoModelForSequenceClassification", model_dir)

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """The label names by class index (``id2label`` as JSON), which the served model reports."""
        return id2label_metadata(model_dir)

    def tokenize(self, tokenizer: Any, batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
        """Token ids of ``text`` (truncated, unpadded), ``labels`` from ``label_id``, and which rows were cut."""
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {
            **encoded,
            "labels": batch["label_id"],
            "truncated": [len(e.overflowing) > 0 for e in encoded.encodings],
        }

    def collator(self, tokenizer: Any) -> Any:
        """Pads each batch to its longest text."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def trainer_options(self) -> dict[str, Any]:
        """The pipeline's defaults fit: evaluate and keep the best checkpoint by the scenario's metric."""
        return {}

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        """The Hugging Face checkpoint (config, safetensors weights, labels)."""
        model.save_pretrained(str(out_dir), safe_serialization=True)
