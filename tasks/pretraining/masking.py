"""Token ids for masked-LM training, and the masking itself: tokens or whole words, and a fixed-mask eval loss.

``tokenize_corpus`` writes the train and held-back texts as token ids (no padding; the special-token
mask, and the character offsets that whole-word masking groups pieces by) to a cache keyed by the
corpus, the tokenizer's vocabulary hash, ``max_length`` and the masking kind, like fine-tuning's
tokenization. ``mlm_collator`` pads per batch and masks: with ``whole_word`` every piece of a word
is masked together (transformers' ``DataCollatorForLanguageModeling(whole_word_mask=True)``, which
finds words by offsets: a piece that starts where the previous one ended continues its word), and
masked positions always become ``[MASK]``. ``held_back_loss`` measures the MLM loss on the held-back
texts with masks drawn from a fixed seed, so a loss before and after training compare the same masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.model_source import tokenizer_hash
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.pretraining.config import MaskedLMTraining
from finetune_flows.tasks.pretraining.corpus import CorpusResult

logger = logging.getLogger(__name__)

_TOKENIZE_VERSION = "1"
SPLITS = ("train", "held_back")
EVAL_MASKED_TOKENS = 2048
"""Masked tokens ``held_back_loss`` aims for: a small held-back set is measured over several mask draws."""
MAX_EVAL_ROUNDS = 8


class TokenizedCorpus(BaseModel):
    """Where the token ids are (``train/``, ``held_back/``: datasets saved to disk)."""

    model_config = ConfigDict(frozen=True)

    tokenized_dir: str
    tokenizer_hash: str
    max_length: int
    whole_word: bool
    train_rows: int
    held_back_rows: int
    truncation_rate: float
    cached: bool = False


def tokenize_corpus(
    corpus_dir: Path, model_dir: Path, data_hash: str, max_length: int, whole_word: bool, cache_dir: Path
) -> TokenizedCorpus:
    """Token ids of the corpus's train and held-back texts with the tokenizer in ``model_dir`` (cached)."""
    vocab = tokenizer_hash(model_dir)
    key = hashlib.sha256(f"{_TOKENIZE_VERSION}|{data_hash}|{vocab}|{max_length}|{whole_word}".encode()).hexdigest()
    out = cache_dir / "mlm-tokenized" / key[:20]
    if (out / "meta.json").is_file():
        logger.info("tokenize: reusing cached token ids %s", out)
        meta = TokenizedCorpus.model_validate_json((out / "meta.json").read_text())
        return meta.model_copy(update={"cached": True})

    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    if tokenizer.mask_token is None:
        raise ValueError(f"the tokenizer in {model_dir} has no mask token: it cannot train a masked LM")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(
            batch["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True,
            return_offsets_mapping=whole_word, return_overflowing_tokens=False, return_length=True,
        )  # fmt: skip
        full = tokenizer(batch["text"], truncation=False, return_length=True)["length"]
        encoded["truncated"] = [n > max_length for n in full]
        return dict(encoded)

    counts: dict[str, int] = {}
    truncated = 0
    for split in SPLITS:
        source = Dataset.from_parquet(str(corpus_dir / f"{split}.parquet"))
        tokens = source.map(encode, batched=True, batch_size=1000, remove_columns=source.column_names)
        truncated += sum(tokens["truncated"])
        tokens = tokens.remove_columns(["truncated", "length"])
        counts[split] = len(tokens)
        tokens.save_to_disk(str(out / split))
    result = TokenizedCorpus(
        tokenized_dir=str(out),
        tokenizer_hash=vocab,
        max_length=max_length,
        whole_word=whole_word,
        train_rows=counts["train"],
        held_back_rows=counts["held_back"],
        truncation_rate=truncated / max(1, sum(counts.values())),
    )
    (out / "meta.json").write_text(json.dumps(result.model_dump(), indent=2))
    logger.info("tokenize: %d train / %d held-back texts", result.train_rows, result.held_back_rows)
    return result


class MaskingCollator:
    """Pads a batch and masks ``training.mlm_probability`` of its tokens (of its words, with ``whole_word``);
    masked positions become ``[MASK]`` and are the only ones with labels (the others -100).

    transformers' collator does the masking; this one pads the character offsets that whole-word masking
    reads (``tokenizer.pad`` leaves them ragged) and drops them from the model's inputs. ``seed`` fixes the
    masks of every batch drawn after it (a fresh collator draws the same masks again)."""

    def __init__(self, tokenizer: Any, training: MaskedLMTraining, seed: int | None = None) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        self.whole_word = training.whole_word
        self.masker = DataCollatorForLanguageModeling(
            tokenizer=tokenizer,
            mlm=True,
            whole_word_mask=training.whole_word,
            mlm_probability=training.mlm_probability,
            mask_replace_prob=1.0,  # whole-word masking allows nothing else; token masking keeps the same rule
            random_replace_prob=0.0,
            seed=seed,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        offsets = [list(e.get("offset_mapping", [])) for e in examples]
        features = [{k: v for k, v in e.items() if k != "offset_mapping"} for e in examples]
        batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
        special = batch.pop("special_tokens_mask")  # padding counts as special: never masked
        width = batch["input_ids"].shape[1]
        padded = torch.tensor([[*map(list, rows), *([[0, 0]] * (width - len(rows)))] for rows in offsets])
        masker = self.masker
        if masker.seed is not None and masker.generator is None:
            masker.create_rng("pt")
        batch["input_ids"], batch["labels"] = masker.torch_mask_tokens(
            batch["input_ids"], special_tokens_mask=special, offset_mapping=padded if self.whole_word else None
        )
        return batch


def mlm_collator(tokenizer: Any, training: MaskedLMTraining, seed: int | None = None) -> MaskingCollator:
    """The batch collator of masked-LM training and evaluation (``MaskingCollator``)."""
    return MaskingCollator(tokenizer, training, seed)


def held_back_loss(model: Any, dataset: Any, tokenizer: Any, training: MaskedLMTraining, batch_size: int = 64) -> float:
    """Mean MLM cross-entropy per masked token on ``dataset``, with masks drawn from ``training.seed`` (the same
    masks every call); a small set is measured over several draws (about ``EVAL_MASKED_TOKENS`` masked tokens)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = len(dataset)
    expected_per_round = max(1.0, sum(len(ids) - 2 for ids in dataset["input_ids"]) * training.mlm_probability)
    rounds = min(MAX_EVAL_ROUNDS, max(1, math.ceil(EVAL_MASKED_TOKENS / expected_per_round)))
    with torch.no_grad():
        for draw in range(rounds):
            collator = mlm_collator(tokenizer, training, seed=training.seed + draw)
            for start in range(0, rows, batch_size):
                batch = collator([dataset[i] for i in range(start, min(rows, start + batch_size))])
                masked = int((batch["labels"] != -100).sum())
                if masked == 0:
                    continue
                output = model(**{k: v.to(device) for k, v in batch.items()})
                total += float(output.loss) * masked
                count += masked
    model.train(was_training)
    if count == 0:
        raise ValueError(f"no token of the {rows} held-back texts was masked in {rounds} draws; hold back more text")
    return total / count


@task(name="tokenize-corpus")
def tokenize_texts(corpus: CorpusResult, model_dir: str, max_length: int, whole_word: bool) -> TokenizedCorpus:
    """Token ids of the corpus for masked-LM training; cached by corpus, tokenizer, max length and masking kind."""
    return tokenize_corpus(
        Path(corpus.corpus_dir), Path(model_dir), corpus.data_hash, max_length, whole_word, get_settings().cache_dir
    )
