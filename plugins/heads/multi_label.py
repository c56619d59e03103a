"""Head ``multi-label``: any number of labels per text (none, one or several), one sigmoid per label.

A linear layer over the encoder's pooled output gives one logit per label; training minimises the
binary cross-entropy of each (Hugging Face's ``problem_type="multi_label_classification"``:
``BCEWithLogitsLoss`` on float multi-hot targets). The prepared dataset carries the targets as
``multi_hot`` (a float per label, in the order of the prepared label list). A label is predicted
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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function in float64, without overflow for large logits of either sign."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


class MultiLabelHead:
    """One independent yes/no decision per label over the encoder's pooled output, trained with BCE."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "multi-label"
    description: ClassVar[str] = "Multi-label classification: any subset of N labels per text (sigmoid outputs)."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = "finetune_flows.tasks.classification.multilabel:MultiLabelEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.multilabel_model"
    export_output: ClassVar[str] = "logits"
    target_column: ClassVar[str] = "multi_hot"
    """Column of the prepared dataset with the float multi-hot targets."""

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """The encoder at ``source`` (a local folder) with a fresh (or matching) layer of one logit per label."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(id2label),
            id2label=dict(id2label),
            label2id={label: index for index, label in id2label.items()},
            problem_type="multi_label_classification",
            use_safetensors=True,
            trust_remote_code=False,
            # A warm start from a model with other labels gets a new classifier layer.
            ignore_mismatched_sizes=True,
        )

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(multi-hot predictions at ``DEFAULT_THRESHOLD``, sigmoid probabilities), both of ``logits``' shape."""
        probs = sigmoid(logits)
        return (probs >= DEFAULT_THRESHOLD).astype(np.int64), probs

    def export_module(self, model_dir: Path) -> Any:
        """The checkpoint at ``model_dir`` returning its logits (one per label): what is exported and checked."""
        import torch
        from transformers import AutoModelForSequenceClassification

        class Logits(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    str(model_dir), use_safetensors=True, attn_implementation="eager"
                )

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
            ) -> torch.Tensor:
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
                return self.model(**{k: v for k, v in inputs.items() if v is not None}).logits

        return Logits().eval()

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """The label names by output index (``id2label`` as JSON) and ``problem_type``: the served model applies a
        sigmoid per label, not a softmax."""
        from transformers import AutoConfig

        id2label = AutoConfig.from_pretrained(str(model_dir)).id2label
        return {
            "id2label": json.dumps({str(k): v for k, v in id2label.items()}),
            "problem_type": "multi_label_classification",
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
        """The Hugging Face checkpoint (config with labels and problem type, safetensors weights)."""
        model.save_pretrained(str(out_dir), safe_serialization=True)
