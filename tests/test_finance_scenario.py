"""The finance-monitoring scenario: Financial PhraseBank reading, the FinBERT protocol split and
class weights."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.training_options import balanced_class_weights

SCENARIO = SCENARIOS.get("finance-monitoring")
BUNDLED = SCENARIO.sample().train


def finbert_options() -> IngestOptions:
    config = FinetuneConfig.for_scenario("finance-monitoring")
    return IngestOptions(
        eval_fraction=config.data.eval_fraction, test_fraction=config.data.test_fraction, seed=config.training.seed
    )


def test_reads_phrasebank_lines_splitting_at_the_last_at_sign(tmp_path: Path) -> None:
    path = tmp_path / "Sentences_test.txt"
    path.write_text("Profit rose to EUR 5 mn @ quarter end@positive\nSales were flat .@neutral\n", encoding="utf-8")
    frame = SCENARIO.read_file(path)
    assert frame is not None
    assert frame.to_dict("records") == [
        {"sentence": "Profit rose to EUR 5 mn @ quarter end", "label": "positive"},
        {"sentence": "Sales were flat .", "label": "neutral"},
    ]


def test_latin1_bytes_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "Sentences_latin1.txt"
    path.write_bytes(b"Sales rose .@positive\nNet loss of EUR 3 mn .@negative\nCaf\xe9 chain expands .@positive\n")
    with pytest.raises(DataError, match=r"not valid UTF-8 .*Sentences_latin1\.txt, line 3") as caught:
        SCENARIO.read_file(path)
    assert caught.value.line == 3 and "Caf" in str(caught.value.value)


def test_a_line_without_label_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "Sentences_bad.txt"
    path.write_text("Sales rose .@positive\nno label here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no '@' .*line 2, value 'no label here'"):
        SCENARIO.read_file(path)


def test_other_formats_go_to_the_generic_readers(tmp_path: Path) -> None:
    assert SCENARIO.read_file(tmp_path / "news.csv") is None


def test_bundled_50agree_follows_the_finbert_protocol(tmp_path: Path) -> None:
    result = ingest_files(BUNDLED, None, SCENARIO, finbert_options(), tmp_path / "cache")
    # 4,846 lines, 6 exact duplicates removed from training by the backbone's dedupe rule.
    assert result.duplicates_removed == 6
    assert result.train_rows + result.eval_rows + result.test_rows + result.eval_overlap_removed == 4840
    assert result.labels == ["negative", "neutral", "positive"]
    parts = {name: pd.read_parquet(Path(result.dataset_dir) / f"{name}.parquet") for name in ("train", "eval", "test")}
    # Stratified 20% test, then 20% of the rest as validation, per class.
    all_counts = pd.concat(parts.values())["label"].value_counts()
    for label, count in parts["test"]["label"].value_counts().items():
        assert count == pytest.approx(0.2 * all_counts[label], abs=2)
    for label, count in parts["eval"]["label"].value_counts().items():
        assert count == pytest.approx(0.2 * 0.8 * all_counts[label], abs=3)
    # No held-out text is seen in training.
    train_texts = set(parts["train"]["text"])
    assert not train_texts & set(parts["test"]["text"]) and not train_texts & set(parts["eval"]["text"])
    # Same seed, same split.
    again = ingest_files(BUNDLED, None, SCENARIO, finbert_options(), tmp_path / "other-cache")
    assert again.data_hash == result.data_hash and again.test_hash == result.test_hash


def test_a_test_file_is_used_as_given(tmp_path: Path) -> None:
    test_file = tmp_path / "held_out.csv"
    pd.DataFrame({"text": ["Orders grew 30 % .", "The unit was closed ."], "label": ["positive", "negative"]}).to_csv(
        test_file, index=False
    )
    result = ingest_files(BUNDLED, None, SCENARIO, finbert_options(), tmp_path / "cache", test_file=test_file)
    assert result.test_rows == 2


def test_balanced_class_weights() -> None:
    # 6 rows: 3 of class 0, 2 of class 1, 1 of class 2 -> n / (k * n_c)
    assert balanced_class_weights([0, 0, 0, 1, 1, 2], 3) == pytest.approx([6 / 9, 6 / 6, 6 / 3])
    assert balanced_class_weights([0, 0], 2) == [0.5, 0.0]  # an absent class gets no weight
