"""Head ``token-classification``: a BIO tag per word piece, read back as slot spans (slot, text, start, end).

The prepared dataset has a ``text`` column and a ``span_ids`` column: a JSON list of ``[slot index,
start, end]`` character spans (Python ``str`` indices, end exclusive; slot ``k`` has tags
``B-`` = 2k+1 and ``I-`` = 2k+2 in ``PreparedData.labels``). ``tokenize`` aligns them with the fast
tokenizer's offset mapping (``aligner``, ``tasks.classification.spans.align_spans``); the exported
graph gives logits of shape (batch, tokens, tags), and the served model decodes them into spans.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finetune_flows.plugins.heads import id2label_metadata, logits_module, softmax
from finetune_flows.plugins.specs import LabelKind

SPANS_COLUMN = "span_ids"


def load(target: str) -> Any:
    """What ``"module:attribute"`` names (the head's task code, imported when used, as ``evaluator`` is)."""
    module, _, attribute = target.partition(":")
    return getattr(import_module(module), attribute)


class TokenClassificationHead:
    """A linear tagger over each token's hidden state (BIO tags per slot type), trained with cross-entropy."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "token-classification"
    description: ClassVar[str] = "BIO tags per word piece, read back as character spans (slot filling)."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = "finetune_flows.tasks.classification.slots:SlotEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.slots_model"
    export_output: ClassVar[str] = "logits"
    new_layers: ClassVar[tuple[str, ...]] = ("classifier",)
    """Modules built on top of the encoder, trained in full under a LoRA adapter (``adapter.train_modules``)."""
    aligner: ClassVar[str] = "finetune_flows.tasks.classification.spans:align_spans"
    """"module:function" that tags one text's tokens from its spans and offsets."""

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """Load the encoder at ``source`` (a local folder) with a fresh (or matching) token classifier."""
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            source,
            num_labels=len(id2label),
            id2label=dict(id2label),
            label2id={label: index for index, label in id2label.items()},
            use_safetensors=True,
            trust_remote_code=False,
            ignore_mismatched_sizes=True,  # a warm start from a model with other tags gets a new classifier
        )

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per token: the arg-max tag ids and the softmax over tags (last axis)."""
        probs = softmax(logits)
        return probs.argmax(axis=-1), probs

    def export_module(self, model_dir: Path) -> Any:
        """The checkpoint at ``model_dir`` returning its per-token logits: what is exported and checked."""
        return logits_module("AutoModelForTokenClassification", model_dir)

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """The tag names by id (``id2label`` as JSON), which the served model decodes spans with."""
        return id2label_metadata(model_dir)

    def tokenize(self, tokenizer: Any, batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
        """Token ids of ``text`` (truncated, unpadded), a tag id per token from ``span_ids`` (-100 on special
        tokens), and which rows were cut."""
        align = load(self.aligner)
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_offsets_mapping=True)
        labels = [
            align(text, [tuple(span) for span in json.loads(spans)], enc.offsets, enc.special_tokens_mask)
            for text, spans, enc in zip(batch["text"], batch[SPANS_COLUMN], encoded.encodings, strict=True)
        ]
        encoded.pop("offset_mapping")
        return {**encoded, "labels": labels, "truncated": [len(e.overflowing) > 0 for e in encoded.encodings]}

    def collator(self, tokenizer: Any) -> Any:
        """Pads each batch to its longest text; padded labels are -100."""
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    def trainer_options(self) -> dict[str, Any]:
        """The pipeline's defaults fit: evaluate and keep the best checkpoint by span F1."""
        return {}

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        """The Hugging Face checkpoint (config with the tag names, safetensors weights)."""
        model.save_pretrained(str(out_dir), safe_serialization=True)
