"""Head ``sequence-classification``: one label per text, N classes taken from the data."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from finetune_flows.plugins.heads import softmax
from finetune_flows.plugins.specs import LabelKind


class SequenceClassificationHead:
    """A linear classifier over the encoder's pooled output, trained with cross-entropy."""

    api_version: ClassVar[int] = 1
    name: ClassVar[str] = "sequence-classification"
    description: ClassVar[str] = "Single-label classification into N classes taken from the data."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL

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
