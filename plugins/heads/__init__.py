"""Built-in task heads, and what they share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def new_layers(head: Any) -> tuple[str, ...]:
    """Names of the modules ``head.build_model`` adds on top of the pretrained encoder (``head.new_layers``, e.g.
    ``("classifier",)``): a LoRA adapter trains them in full. A head without the attribute adds none."""
    return tuple(getattr(head, "new_layers", ()))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, computed stably in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def logits_module(auto_class: str, model_dir: Path) -> Any:
    """The Hugging Face checkpoint at ``model_dir`` (loaded with ``transformers.<auto_class>``, eager attention) as
    an eval-mode module returning only its logits: what a head exports and checks for parity."""
    import torch
    import transformers

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = getattr(transformers, auto_class).from_pretrained(
                str(model_dir), use_safetensors=True, attn_implementation="eager"
            )

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{k: v for k, v in inputs.items() if v is not None}).logits

    return Logits().eval()


def id2label_metadata(model_dir: Path) -> dict[str, str]:
    """``{"id2label": JSON}`` from the checkpoint's config: the names the served model reports."""
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(str(model_dir)).id2label
    return {"id2label": json.dumps({str(k): v for k, v in id2label.items()})}
