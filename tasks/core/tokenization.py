"""Stage 2, tokenize: the ingested dataset -> token ids on disk, without padding.

Uses the model's fast tokenizer through ``datasets.map(batched=True)``. The output is cached
under a key of data hash + tokenizer identity (vocabulary hash) + max length + head, so a second
run with the same inputs loads it (and says so). Padding happens per batch at training time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.core.model_source import tokenizer_hash
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.stages import PreparedData

logger = logging.getLogger(__name__)

_TOKENIZE_VERSION = "1"


class TokenizeResult(BaseModel):
    """Where the token ids are, and what truncation did."""

    model_config = ConfigDict(frozen=True)

    tokenized_dir: str
    cache_key: str
    tokenizer_hash: str
    max_length: int
    train_rows: int
    eval_rows: int
    truncation_rate: float
    select_rows: int = 0
    """Rows of the selection split (tokenized to ``select/`` when the dataset has one)."""
    cached: bool = False


def tokenize_dataset(
    dataset_dir: Path, model_dir: Path, data_hash: str, max_length: int, head: str, cache_dir: Path
) -> TokenizeResult:
    """Tokenize train and eval (and select, when there is one) of ``dataset_dir`` with the tokenizer in
    ``model_dir``; ``head`` builds the features."""
    vocab = tokenizer_hash(model_dir)
    splits = ("train", "eval", "select") if (dataset_dir / "select.parquet").is_file() else ("train", "eval")
    with_select = "|select" if "select" in splits else ""
    key = hashlib.sha256(
        f"{_TOKENIZE_VERSION}|{data_hash}|{vocab}|{max_length}|{head}{with_select}".encode()
    ).hexdigest()[:20]
    out = cache_dir / "tokenized" / key
    if (out / "meta.json").is_file():
        result = TokenizeResult.model_validate_json((out / "meta.json").read_text())
        logger.info("tokenize: reusing cached token ids %s (key %s)", out, key)
        return result.model_copy(update={"cached": True})

    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, trust_remote_code=False)
    if not tokenizer.is_fast:
        raise ValueError(f"the tokenizer in {model_dir} has no fast (Rust) implementation")

    plugin = HEADS.get(head)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return plugin.tokenize(tokenizer, batch, max_length)

    truncated = 0
    total = 0
    counts = {}
    for split in splits:
        source = Dataset.from_parquet(str(dataset_dir / f"{split}.parquet"))
        tokenized = source.map(encode, batched=True, batch_size=1000, remove_columns=source.column_names)
        if "truncated" in tokenized.column_names:
            truncated += sum(tokenized["truncated"])
            tokenized = tokenized.remove_columns("truncated")
        total += len(tokenized)
        counts[split] = len(tokenized)
        tokenized.save_to_disk(str(out / split))

    result = TokenizeResult(
        tokenized_dir=str(out),
        cache_key=key,
        tokenizer_hash=vocab,
        max_length=max_length,
        train_rows=counts["train"],
        eval_rows=counts["eval"],
        select_rows=counts.get("select", 0),
        truncation_rate=truncated / max(total, 1),
    )
    (out / "meta.json").write_text(json.dumps(result.model_dump(), indent=2))
    logger.info(
        "tokenize: %d train / %d eval rows at max_length %d, %.2f%% truncated",
        result.train_rows,
        result.eval_rows,
        max_length,
        100 * result.truncation_rate,
    )
    return result


@task(name="tokenize")
def tokenize_data(data: PreparedData, model_dir: str, head: str, max_length: int) -> TokenizeResult:
    """Token ids for the prepared dataset, built by the head; cached by data, tokenizer, max length and head."""
    return tokenize_dataset(
        Path(data.dataset_dir), Path(model_dir), data.data_hash, max_length, head, get_settings().cache_dir
    )
