"""Head ``multi-label``: any number of labels per text (none, one or several), one sigmoid per label.

A linear layer over the mean of the encoder's token embeddings (``pooled_encoder``: mean pooling
over the attention mask, dropout, linear; sentence encoders such as all-MiniLM-L6-v2 are made to be
read that way, not through BERT's [CLS] pooler) gives one logit per label; training minimises the
binary cross-entropy of each against float multi-hot targets. The prepared dataset carries the
targets as ``multi_hot`` (a float per label, in the order of the prepared label list). A label is predicted
when its probability reaches its threshold: 0.5 while training; per-label thresholds tuned on eval
by the evaluation (``tasks.classification.multilabel``) are shipped with the served model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finetune_flows.plugins.specs import LabelKind

DEFAULT_THRESHOLD = 0.5
"""Where a label counts as predicted when no tuned threshold is known (in training, for instance)."""
LOSS = "bce"
"""The ``pooled_encoder`` loss: binary cross-entropy of each label's logit against its float target."""


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function in float64, without overflow for large logits of either sign."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


class MultiLabelHead:
    """One independent yes/no decision per label over the encoder's mean-pooled output, trained with BCE."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "multi-label"
    description: ClassVar[str] = "Multi-label classification: any subset of N labels per text (sigmoid outputs)."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = "finetune_flows.tasks.classification.multilabel:MultiLabelEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.multilabel_model"
    export_output: ClassVar[str] = "logits"
    new_layers: ClassVar[tuple[str, ...]] = ("classifier",)
    """Modules built on top of the encoder, trained in full under a LoRA adapter (``adapter.train_modules``)."""
    target_column: ClassVar[str] = "multi_hot"
    """Column of the prepared dataset with the float multi-hot targets."""

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """The encoder at ``source`` (a local folder) under mean pooling, dropout and a linear layer of one logit per
        label, trained with BCE (``pooled_encoder``); a model this head saved warm-starts its layer too (same labels).
        """
        from finetune_flows.plugins.heads import pooled_encoder

        return pooled_encoder.build(Path(source), id2label, LOSS)

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(multi-hot predictions at ``DEFAULT_THRESHOLD``, sigmoid probabilities), both of ``logits``' shape."""
        probs = sigmoid(logits)
        return (probs >= DEFAULT_THRESHOLD).astype(np.int64), probs

    def export_module(self, model_dir: Path) -> Any:
        """The model at ``model_dir`` in eval mode returning its logits (one per label): what is exported, checked and
        (through the ONNX graph) evaluated."""
        from finetune_flows.plugins.heads import pooled_encoder

        return pooled_encoder.ExportedLogits(pooled_encoder.load(model_dir, attn_implementation="eager")).eval()

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """The label names by output index (``id2label`` as JSON), ``problem_type`` (the served model applies a
        sigmoid per label, not a softmax) and the pooling, for the record."""
        from finetune_flows.plugins.heads.pooled_encoder import HEAD_CONFIG

        saved = json.loads((Path(model_dir) / HEAD_CONFIG).read_text(encoding="utf-8"))
        return {
            "id2label": json.dumps(saved["id2label"]),
            "problem_type": "multi_label_classification",
            "pooling": saved["pooling"],
        }

    def tokenize(self, tokenizer: Any, batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
        """Token ids of ``text`` (truncated, unpadded), float ``labels`` from ``multi_hot``, and which rows were cut."""
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {
            **encoded,
            "labels": [[float(v) for v in row] for row in batch[self.target_column]],
            "truncated": [len(e.overflowing) > 0 for e in encoded.encodings],
        }

    def collator(self, tokenizer: Any) -> Any:
        """Pads each batch to its longest text; the multi-hot targets become one float tensor."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def trainer_options(self) -> dict[str, Any]:
        """The pipeline's defaults fit: evaluate while training and keep the best checkpoint by micro-F1."""
        return {}

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        """The encoder (Hugging Face format), the linear layer (safetensors) and ``pooled_head.json`` (labels,
        pooling, problem type): what ``build_model`` warm-starts from and ``export_module`` loads."""
        from finetune_flows.plugins.heads import pooled_encoder

        pooled_encoder.save(model, out_dir)
