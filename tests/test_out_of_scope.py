"""Out-of-scope rows set aside at ingest (``data.out_of_scope_label``, ``data.held_out_labels``) and the hand-off
threshold chosen for an out-of-scope recall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.tasks.classification.handoff import out_of_scope_rates, recall_threshold
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.out_of_scope import OUT_OF_SCOPE_FILE, held_out_labels
from tests.test_customer_service import MESSAGES, banking_csv

SCENARIO = SCENARIOS.get("customer-service")


def test_held_out_labels_are_seeded_and_leave_at_least_two() -> None:
    labels = pd.Series(["a", "b", "c", "d", "e"] * 3)
    assert held_out_labels(labels, 2, seed=7) == held_out_labels(labels, 2, seed=7)
    assert len(set(held_out_labels(labels, 2, seed=7))) == 2 and held_out_labels(labels, 0, seed=7) == []
    assert {tuple(held_out_labels(labels, 2, seed=s)) for s in range(10)} != {tuple(held_out_labels(labels, 2, 7))}
    with pytest.raises(ValueError, match=r"data.held_out_labels=4 leaves 1 of 5 labels"):
        held_out_labels(labels, 4, seed=7)


def test_ingest_keeps_held_out_labels_out_of_training_and_their_eval_and_test_rows_apart(tmp_path: Path) -> None:
    train = banking_csv(tmp_path / "train.csv", 40)
    test = tmp_path / "test.csv"
    pd.DataFrame({"text": [f"other words {n}" for n in range(8)], "category": ["card_arrival"] * 8}).to_csv(
        test, index=False
    )  # a test file of one intent: held out or not, it must land in the right place
    result = ingest_files(
        train, None, SCENARIO, IngestOptions(eval_fraction=0.2, held_out_labels=1, seed=3), tmp_path / "c", test
    )
    [held] = result.held_out_labels
    assert held not in result.labels and len(result.labels) == len(MESSAGES) - 1
    folder = Path(result.dataset_dir)
    for split in ("train", "eval", "test"):
        assert held not in set(pd.read_parquet(folder / f"{split}.parquet")["label"])
    out = pd.read_parquet(folder / OUT_OF_SCOPE_FILE)
    assert set(out["label"]) == {held} and set(out["split"]) <= {"eval", "test"}
    assert (out["split"] == "eval").sum() == 8  # 20% of 40 rows of the held-out intent, stratified
    assert ((out["split"] == "test").sum() == 8) == (held == "card_arrival")
    assert result.out_of_scope_rows == len(out) and f"held-out labels {held})" in result.splits


def test_rows_with_the_out_of_scope_label_never_train_and_are_not_a_class(tmp_path: Path) -> None:
    oos = "".join(f"what is the weather like on day {n},oos\n" for n in range(30))
    train = banking_csv(tmp_path / "train.csv", 30, extra=oos)
    with pytest.raises(DataError, match=r"unknown label for scenario 'customer-service'.*row 121, column 'category'"):
        ingest_files(train, None, SCENARIO, IngestOptions(), tmp_path / "c")  # without the option: an unknown label
    result = ingest_files(train, None, SCENARIO, IngestOptions(out_of_scope_label="oos"), tmp_path / "c")
    assert "oos" not in result.labels and "__out_of_scope__" not in result.labels
    assert result.train_rows + result.eval_rows == 120  # the 4 intents' rows only
    out = pd.read_parquet(Path(result.dataset_dir) / OUT_OF_SCOPE_FILE)
    assert set(out["split"]) == {"eval"} and len(out) == 3 and out["text"].str.startswith("what is the weather").all()


def test_too_many_held_out_labels_name_the_file(tmp_path: Path) -> None:
    train = banking_csv(tmp_path / "train.csv", 10)
    with pytest.raises(DataError, match=r"data.held_out_labels=3 leaves 1 of 4 labels: a classifier needs at least two"
                       rf" \(file {tmp_path / 'train.csv'}, column 'category'\)"):  # fmt: skip
        ingest_files(train, None, SCENARIO, IngestOptions(held_out_labels=3), tmp_path / "c")


def test_the_recall_threshold_hands_off_at_least_that_share_of_out_of_scope_messages() -> None:
    rng = np.random.default_rng(0)
    outside = rng.uniform(0.1, 0.9, size=200)
    for recall in (0.5, 0.8, 0.95, 1.0):
        threshold = recall_threshold(outside, recall)
        handed = outside < threshold
        assert handed.mean() >= recall and (outside < np.nextafter(threshold, 0)).mean() < recall  # the lowest
        everything = np.concatenate([rng.uniform(0.5, 1.0, size=100), outside])
        is_out = np.arange(300) >= 100
        assert out_of_scope_rates(everything, is_out, threshold)[0] == pytest.approx(handed.mean())
