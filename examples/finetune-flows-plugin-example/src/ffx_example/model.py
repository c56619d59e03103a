"""The torch module of head ``mean-pooled-classifier``: encoder -> mean pooling -> dropout -> linear.

A checkpoint folder holds the encoder as a Hugging Face model (``config.json``, safetensors) plus
the head's own two files: ``HEAD_CONFIG`` (labels, dropout) and ``HEAD_WEIGHTS`` (the linear layer).
Imported only when a model is built, trained or exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

HEAD_CONFIG = "mean_pooled_head.json"
HEAD_WEIGHTS = "mean_pooled_head.safetensors"
DEFAULT_DROPOUT = 0.1


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of the token embeddings where the mask is 1 (an all-padding row stays finite)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MeanPooledClassifier(torch.nn.Module):
    """Logits of a linear layer over the mean-pooled last hidden state; cross-entropy when labels are given."""

    def __init__(self, encoder: Any, id2label: dict[int, str], dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        self.encoder = encoder
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, len(self.id2label))

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        hidden = self.encoder(**{k: v for k, v in inputs.items() if v is not None}).last_hidden_state
        return self.classifier(self.dropout(mean_pool(hidden, attention_mask)))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        logits = self.logits(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return {"logits": logits}
        return {"loss": torch.nn.functional.cross_entropy(logits.float(), labels), "logits": logits}


class ExportedLogits(torch.nn.Module):
    """What is traced to ONNX and checked for parity: ``forward`` returns the classifier's logits only."""

    def __init__(self, model: MeanPooledClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.logits(input_ids, attention_mask, token_type_ids)


def read_head_config(folder: Path) -> dict[str, Any] | None:
    """The head's settings saved in ``folder`` (``id2label`` with int keys, ``dropout``), or None if none."""
    path = folder / HEAD_CONFIG
    if not path.is_file():
        return None
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
    return config


def build(source: Path, id2label: dict[int, str], **encoder_options: Any) -> MeanPooledClassifier:
    """The encoder at ``source`` with this head on top; the head's weights too when ``source`` holds them for
    the same labels (a warm start from an earlier version), else a fresh linear layer."""
    encoder = AutoModel.from_pretrained(str(source), use_safetensors=True, **encoder_options)
    saved = read_head_config(source)
    dropout = saved["dropout"] if saved else DEFAULT_DROPOUT
    model = MeanPooledClassifier(encoder, id2label, dropout)
    if saved is not None and saved["id2label"] == model.id2label:
        model.classifier.load_state_dict(load_file(str(source / HEAD_WEIGHTS)))
    return model


def load(folder: Path, **encoder_options: Any) -> MeanPooledClassifier:
    """A checkpoint written by ``save``, with the labels it was trained on."""
    saved = read_head_config(folder)
    if saved is None:
        raise FileNotFoundError(f"{folder / HEAD_CONFIG} is missing: {folder} is not a mean-pooled-classifier model")
    return build(folder, saved["id2label"], **encoder_options)


def save(model: MeanPooledClassifier, folder: Path) -> None:
    """Write the encoder (Hugging Face format), the linear layer and the head's settings to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(folder), safe_serialization=True)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.classifier.state_dict().items()}
    save_file(weights, str(folder / HEAD_WEIGHTS))
    settings = {
        "id2label": {str(k): v for k, v in model.id2label.items()},
        "dropout": model.dropout.p,
        "pooling": "mean",
    }
    (folder / HEAD_CONFIG).write_text(json.dumps(settings, indent=2), encoding="utf-8")
