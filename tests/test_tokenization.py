"""tokenize_dataset: unpadded token ids per split, labels carried over, a content-keyed cache,
and a truncation rate counted exactly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetune_flows.plugins import SCENARIOS
from finetune_flows.tasks.core.ingestion import IngestOptions, IngestResult, ingest_files
from finetune_flows.tasks.core.tokenization import tokenize_dataset

HEAD = "sequence-classification"

# Every word here is one WordPiece token in MiniLM's uncased vocabulary, so a text of k words is
# k + 2 tokens ([CLS] ... [SEP]). At max_length 8, texts of 7 or more words are truncated; a text
# of exactly 6 words (8 tokens) fits and must not count as truncated.
TRAIN = [
    ("good film", "1"),  # 4 tokens
    ("bad film", "0"),  # 4
    ("the film was very good", "1"),  # 7
    ("the film was very bad", "0"),  # 7
    ("the film was very very good", "1"),  # 8: exactly max_length
    ("the plot was very very bad", "0"),  # 8: exactly max_length
    ("the film was very very very good", "1"),  # 9: truncated
    ("the acting and the story were really bad", "0"),  # 10: truncated
]
EVAL = [
    ("great movie", "1"),  # 4
    ("boring movie", "0"),  # 4
    ("the movie was great and the acting was good", "1"),  # 11: truncated
    ("the movie was boring", "0"),  # 6
]
TRUNCATED_AT_8 = 3  # two train texts and one eval text


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


@pytest.fixture
def known_lengths(tmp_path: Path) -> IngestResult:
    """An ingested dataset whose texts have known token lengths."""
    train = _write_tsv(tmp_path / "train.tsv", TRAIN)
    evaluation = _write_tsv(tmp_path / "dev.tsv", EVAL)
    return ingest_files(train, evaluation, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")


def _full_length(text: str) -> int:
    return len(text.split()) + 2


def test_premise_every_word_is_one_token(tiny_model_dir: Path) -> None:
    """Guards the other tests' arithmetic: the words used really are single tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for text, _ in TRAIN + EVAL:
        assert len(tokenizer(text)["input_ids"]) == _full_length(text), text


def test_saves_unpadded_splits_with_labels(known_lengths: IngestResult, tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    result = tokenize_dataset(
        Path(known_lengths.dataset_dir), tiny_model_dir, known_lengths.data_hash, 8, HEAD, tmp_path / "cache"
    )

    assert not result.cached
    assert (result.train_rows, result.eval_rows) == (len(TRAIN), len(EVAL))
    assert result.max_length == 8
    out = Path(result.tokenized_dir)
    assert out.parent == tmp_path / "cache" / "tokenized"
    for split, rows in (("train", TRAIN), ("eval", EVAL)):
        data = load_from_disk(str(out / split))
        assert set(data.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        lengths = [len(ids) for ids in data["input_ids"]]
        # No padding: each row is as long as its own text (capped at max_length), so lengths vary.
        assert lengths == [min(_full_length(text), 8) for text, _ in rows]
        assert len(set(lengths)) > 1
        assert all(all(m == 1 for m in mask) for mask in data["attention_mask"])
        # Labels follow the sorted label ids: negative -> 0, positive -> 1 ("0"/"1" in the files).
        assert known_lengths.labels == ["negative", "positive"]
        assert data["labels"] == [int(label) for _, label in rows]


def test_truncation_rate_is_exact(known_lengths: IngestResult, tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset_dir, cache = Path(known_lengths.dataset_dir), tmp_path / "cache"

    at_8 = tokenize_dataset(dataset_dir, tiny_model_dir, known_lengths.data_hash, 8, HEAD, cache)
    at_16 = tokenize_dataset(dataset_dir, tiny_model_dir, known_lengths.data_hash, 16, HEAD, cache)

    assert at_8.truncation_rate == TRUNCATED_AT_8 / (len(TRAIN) + len(EVAL))
    assert at_16.truncation_rate == 0.0


def test_second_call_reuses_the_cache(
    known_lengths: IngestResult, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = (
        Path(known_lengths.dataset_dir),
        tiny_model_dir,
        known_lengths.data_hash,
        8,
        HEAD,
        tmp_path / "cache",
    )
    first = tokenize_dataset(*args)

    caplog.set_level(logging.INFO, logger="finetune_flows.tasks.core.tokenization")
    second = tokenize_dataset(*args)

    assert not first.cached
    assert second.cached
    assert second.model_copy(update={"cached": False}) == first
    assert "reusing cached token ids" in caplog.text
    assert first.cache_key in caplog.text


def test_cache_key_depends_on_max_length_and_data(
    known_lengths: IngestResult, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dataset_dir, cache = Path(known_lengths.dataset_dir), tmp_path / "cache"

    base = tokenize_dataset(dataset_dir, tiny_model_dir, known_lengths.data_hash, 8, HEAD, cache)
    longer = tokenize_dataset(dataset_dir, tiny_model_dir, known_lengths.data_hash, 9, HEAD, cache)
    other_data = tokenize_dataset(dataset_dir, tiny_model_dir, "another-data-hash", 8, HEAD, cache)

    assert not longer.cached and not other_data.cached
    assert len({base.cache_key, longer.cache_key, other_data.cache_key}) == 3
    assert base.tokenized_dir != longer.tokenized_dir
    assert longer.max_length == 9
