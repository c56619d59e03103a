"""Head ``bi-encoder``: one shared encoder embeds a query (a user profile) and an item; the score
is the scaled cosine of the two mean-pooled, L2-normalised embeddings.

Trained on liked (query, item) pairs against the other items of the batch (in-batch negatives,
the multiple-negatives ranking loss). Items are embedded once and ranked by a matrix product, so
scoring every item for every user stays cheap; the exported graph is the sentence encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.plugins.heads import softmax
from finetune_flows.plugins.specs import LabelKind

if TYPE_CHECKING:
    import torch

PAIR_SIDES = ("query", "item")
POOLING_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
POOLING, NORMALIZE = "mean", "l2"
"""How ``pool`` makes a sentence embedding, as written into the exported graph's metadata."""


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token embeddings where the mask is 1, then scale each row to unit length.

    The one definition of this head's sentence embedding: training (``embed``) and the exported
    graph (``BiEncoderHead.export_module``) both call it, so the parity gate checks this code.
    """
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # The clamp keeps an all-padding row finite, as sentence-transformers' Pooling does.
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def embed(
    encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Sentence embeddings: ``encoder``'s last hidden state pooled by ``pool`` (looked up at call time)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    hidden = encoder(**{k: v for k, v in inputs.items() if v is not None}).last_hidden_state
    return pool(hidden, attention_mask)


def check_pooling(model_dir: Path) -> None:
    """Refuse a sentence-transformers folder whose pooling is not the mean pooling of ``pool``."""
    config = model_dir / "1_Pooling" / "config.json"
    if config.is_file() and not json.loads(config.read_text()).get("pooling_mode_mean_tokens", False):
        raise ConfigError(f"{model_dir} does not use mean pooling ({config}); only mean pooling is exported")


class BiEncoderHead:
    """Scaled cosine similarity between a query embedding and an item embedding."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "bi-encoder"
    description: ClassVar[str] = "Query/item text pairs scored by scaled cosine of one shared encoder."
    label_kind: ClassVar[LabelKind] = LabelKind.RANKING
    text_columns: ClassVar[tuple[str, ...]] = ("query", "item")
    evaluator: ClassVar[str] = "finetune_flows.tasks.ranking.evaluation:RankingEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.pair_model"
    scale: ClassVar[float] = 20.0
    """Cosine similarities are multiplied by this in training; served as the graph's ``score_scale`` metadata."""
    export_output: ClassVar[str] = "embedding"
    new_layers: ClassVar[tuple[str, ...]] = ()
    """None: the score is the pooled encoder itself, so a LoRA adapter trains the adapter only."""

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
                return embed(self.encoder, input_ids, attention_mask)

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

    def export_module(self, model_dir: Path) -> Any:
        """The encoder at ``model_dir`` returning ``embed``'s unit-length rows: what is exported and checked."""
        import torch
        from transformers import AutoModel

        check_pooling(model_dir)

        class SentenceEmbedding(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = AutoModel.from_pretrained(
                    str(model_dir), use_safetensors=True, attn_implementation="eager"
                )

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
            ) -> torch.Tensor:
                return embed(self.encoder, input_ids, attention_mask, token_type_ids)

        return SentenceEmbedding().eval()

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        """Pooling, normalisation, embedding width and ``score_scale`` (this head's ``scale``) for the server."""
        from transformers import AutoConfig

        return {
            "pooling": POOLING,
            "normalize": NORMALIZE,
            "embedding_dim": str(AutoConfig.from_pretrained(str(model_dir)).hidden_size),
            "score_scale": repr(float(self.scale)),
        }

    def tokenize(self, tokenizer: Any, batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
        """Token ids of both sides of each pair (truncated, unpadded), and which pairs had a side cut."""
        features: dict[str, list[Any]] = {}
        cut = [False] * len(batch["query"])
        for side in PAIR_SIDES:
            encoded = tokenizer(batch[side], truncation=True, max_length=max_length, return_token_type_ids=False)
            features[f"{side}_input_ids"] = encoded["input_ids"]
            features[f"{side}_attention_mask"] = encoded["attention_mask"]
            cut = [c or len(e.overflowing) > 0 for c, e in zip(cut, encoded.encodings, strict=True)]
        return {**features, "truncated": cut}

    def collator(self, tokenizer: Any) -> Any:
        """Pads the query side and the item side of a batch each to its own longest text."""
        return PairCollator(tokenizer)

    def trainer_options(self) -> dict[str, Any]:
        """In-batch negatives want full, shuffled batches; there is no per-step metric to stop early on."""
        return {
            "dataloader_drop_last": True,
            "train_sampling_strategy": "random",
            "eval_strategy": "no",
            "load_best_model_at_end": False,
            "metric_for_best_model": None,
        }

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        """The fine-tuned encoder alone, with the source's sentence-transformers pooling files."""
        import shutil

        model.encoder.save_pretrained(str(out_dir), safe_serialization=True)
        for name in POOLING_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, out_dir / name)
        if (source_dir / "1_Pooling").is_dir():
            shutil.copytree(source_dir / "1_Pooling", out_dir / "1_Pooling", dirs_exist_ok=True)


class PairCollator:
    """Pads the ``query_*`` and ``item_*`` features of a list of pairs into the bi-encoder's four tensors."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for side in PAIR_SIDES:
            padded = self.tokenizer.pad(
                [{"input_ids": r[f"{side}_input_ids"], "attention_mask": r[f"{side}_attention_mask"]} for r in rows],
                padding=True,
                return_tensors="pt",
            )
            batch[f"{side}_input_ids"] = padded["input_ids"]
            batch[f"{side}_attention_mask"] = padded["attention_mask"]
        return batch
