"""Head ``mean-pooled-classifier``: one label per text from the mean of the encoder's token embeddings.

Unlike the built-in ``sequence-classification`` head (the encoder's own [CLS]-based classifier,
``AutoModelForSequenceClassification``), this head is its own torch module (``ffx_example.model``):
mean pooling, dropout and a linear layer, trained with cross-entropy. It is served by the core's
ONNX classifier (``serving_entry``), so its export outputs ``logits`` and its metadata holds
``id2label``; it is evaluated on that same exported graph (``ffx_example.evaluation``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finetune_flows.plugins.specs import LabelKind


class MeanPooledClassifierHead:
    """Mean pooling + dropout + linear layer over any Hugging Face encoder; N classes taken from the data."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "mean-pooled-classifier"
    description: ClassVar[str] = "Single-label classification from mean-pooled token embeddings (example plugin)."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = "ffx_example.evaluation:OnnxClassificationEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.classifier_model"
    export_output: ClassVar[str] = "logits"

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """The encoder at ``source`` with a fresh linear layer (or its saved one, for the same labels)."""
        from ffx_example import model

        return model.build(Path(source), id2label)

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
        """The pipeline's defaults fit: evaluate while training and keep the best model by the scenario's metric."""
        return {}

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        """The encoder (Hugging Face format) plus this head's linear layer and settings."""
        from ffx_example import model as modeling

        modeling.save(model, out_dir)

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arg-max ids and softmax probabilities (computed stably in float64)."""
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=-1, keepdims=True)
        return probs.argmax(axis=-1), probs

    def export_module(self, model_dir: Path) -> Any:
        """The model at ``model_dir`` in eval mode, returning its logits: what is exported and checked."""
        from ffx_example import model

        return model.ExportedLogits(model.load(model_dir, attn_implementation="eager")).eval()

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """``id2label`` (JSON), which the served classifier reports, and the pooling, for the record."""
        from ffx_example.model import HEAD_CONFIG

        saved = json.loads((model_dir / HEAD_CONFIG).read_text(encoding="utf-8"))
        return {"id2label": json.dumps(saved["id2label"]), "pooling": saved["pooling"]}
