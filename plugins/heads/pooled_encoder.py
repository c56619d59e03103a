"""A classifier over the mean of an encoder's token embeddings: encoder -> mean pooling -> dropout -> linear.

Sentence encoders such as all-MiniLM-L6-v2 are trained to be read through the mean of their token
embeddings, not through BERT's [CLS] pooler (``AutoModelForSequenceClassification``): a linear
layer on the mean learns from far fewer examples. The loss is chosen per head: ``"cross-entropy"``
(one label per text, integer targets) or ``"bce"`` (any number of labels per text, float
multi-hot targets, one sigmoid per label).

A saved model is a folder holding the encoder as a Hugging Face model (``config.json``,
safetensors) plus the head's two files: ``HEAD_CONFIG`` (labels, pooling, loss, problem type,
dropout) and ``HEAD_WEIGHTS`` (the linear layer). ``build`` on such a folder warm-starts from it;
``load`` reads it back as saved. Imported only when a model is built, trained or exported (it
needs torch and transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HEAD_CONFIG = "pooled_head.json"
HEAD_WEIGHTS = "pooled_head.safetensors"
DEFAULT_DROPOUT = 0.1
PROBLEM_TYPES = {"cross-entropy": "single_label_classification", "bce": "multi_label_classification"}
"""The losses this module trains with, and the Hugging Face ``problem_type`` each stands for."""


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of the token embeddings where the mask is 1 (an all-padding row stays finite)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class PooledEncoderClassifier(torch.nn.Module):
    """Logits of a linear layer over the mean-pooled last hidden state; the head's loss when labels are given."""

    def __init__(self, encoder: Any, id2label: dict[int, str], loss: str, dropout: float = DEFAULT_DROPOUT) -> None:
        super().__init__()
        if loss not in PROBLEM_TYPES:
            raise ValueError(f"loss {loss!r} is not one of {sorted(PROBLEM_TYPES)}")
        self.encoder = encoder
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.loss = loss
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, len(self.id2label))

    @property
    def config(self) -> Any:
        """The encoder's Hugging Face config (layer count for layer-wise learning rates, ``use_cache`` for Trainer)."""
        return self.encoder.config

    @property
    def problem_type(self) -> str:
        """``single_label_classification`` or ``multi_label_classification``, after the loss."""
        return PROBLEM_TYPES[self.loss]

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One logit per label for each text, shape (batch, labels)."""
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
        """``logits``, and ``loss`` when ``labels`` are given (class ids for cross-entropy, multi-hot for BCE)."""
        logits = self.logits(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return {"logits": logits}
        if self.loss == "bce":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        else:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits}


class ExportedLogits(torch.nn.Module):
    """What is traced to ONNX and checked for parity: ``forward`` returns the classifier's logits only."""

    def __init__(self, model: PooledEncoderClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.logits(input_ids, attention_mask, token_type_ids)


def read_head_config(folder: Path) -> dict[str, Any] | None:
    """The head's settings saved in ``folder`` (``id2label`` with int keys, ``loss``, ``dropout``...), or None."""
    path = Path(folder) / HEAD_CONFIG
    if not path.is_file():
        return None
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
    return config


def build(source: Path, id2label: dict[int, str], loss: str, **encoder_options: Any) -> PooledEncoderClassifier:
    """The encoder at ``source`` with this head on top; the head's linear layer too when ``source`` holds one for
    the same labels and loss (a warm start from an earlier version), else a fresh one.

    ``source`` may also be a plain encoder or a Hugging Face classification checkpoint: its encoder is used."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(source), use_safetensors=True, trust_remote_code=False, **encoder_options)
    saved = read_head_config(Path(source))
    dropout = float(saved.get("dropout", DEFAULT_DROPOUT)) if saved else DEFAULT_DROPOUT
    model = PooledEncoderClassifier(encoder, id2label, loss, dropout)
    if saved is not None and saved["id2label"] == model.id2label and saved.get("loss") == loss:
        model.classifier.load_state_dict(load_file(str(Path(source) / HEAD_WEIGHTS)))
    return model


def load(folder: Path, **encoder_options: Any) -> PooledEncoderClassifier:
    """A model written by ``save``, with the labels and loss it was trained with."""
    saved = read_head_config(folder)
    if saved is None:
        raise FileNotFoundError(f"{Path(folder) / HEAD_CONFIG} is missing: {folder} is not a pooled-encoder model")
    return build(folder, saved["id2label"], saved["loss"], **encoder_options)


def save(model: PooledEncoderClassifier, folder: Path) -> None:
    """Write the encoder (Hugging Face format), the linear layer (safetensors) and the head's settings to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(folder), safe_serialization=True)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.classifier.state_dict().items()}
    save_file(weights, str(folder / HEAD_WEIGHTS), metadata={"format": "pt"})
    settings = {
        "id2label": {str(k): v for k, v in model.id2label.items()},
        "pooling": "mean",
        "loss": model.loss,
        "problem_type": model.problem_type,
        "dropout": model.dropout.p,
    }
    (folder / HEAD_CONFIG).write_text(json.dumps(settings, indent=2), encoding="utf-8")
