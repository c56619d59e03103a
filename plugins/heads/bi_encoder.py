"""Head ``bi-encoder``: one shared encoder embeds a query (a user profile) and an item; the score
is the scaled cosine of the two mean-pooled, L2-normalised embeddings.

Trained on liked (query, item) pairs against the other items of the batch (in-batch negatives,
the multiple-negatives ranking loss). Items are embedded once and ranked by a matrix product, so
scoring every item for every user stays cheap; the exported graph is the sentence encoder.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from finetune_flows.plugins.heads import softmax
from finetune_flows.plugins.specs import LabelKind


class BiEncoderHead:
    """Scaled cosine similarity between a query embedding and an item embedding."""

    api_version: ClassVar[int] = 1
    name: ClassVar[str] = "bi-encoder"
    description: ClassVar[str] = "Query/item text pairs scored by scaled cosine of one shared encoder."
    label_kind: ClassVar[LabelKind] = LabelKind.RANKING
    scale: ClassVar[float] = 20.0

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        """The encoder at ``source`` wrapped so that ``forward`` returns the in-batch ranking loss.

        ``id2label`` is unused: a ranking head has no label set.
        """
        import torch
        from transformers import AutoModel

        scale = self.scale

        class BiEncoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = AutoModel.from_pretrained(source, use_safetensors=True)

            def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

            def forward(
                self,
                query_input_ids: torch.Tensor,
                query_attention_mask: torch.Tensor,
                item_input_ids: torch.Tensor,
                item_attention_mask: torch.Tensor,
            ) -> dict[str, torch.Tensor]:
                queries = self.embed(query_input_ids, query_attention_mask)
                items = self.embed(item_input_ids, item_attention_mask)
                logits = scale * queries @ items.T  # row i: query i against every item of the batch
                target = torch.arange(len(logits), device=logits.device)
                return {"loss": torch.nn.functional.cross_entropy(logits, target), "logits": logits}

        return BiEncoder()

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For (queries, candidates) scores: the best candidate and a softmax over candidates."""
        probs = softmax(logits)
        return probs.argmax(axis=-1), probs
