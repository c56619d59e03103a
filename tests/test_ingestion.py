"""Stage 1, ingest: reading, column resolution, row validation, splitting, dedup and caching."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.plugins.specs import DataLayout, Scenario, ScenarioBase
from finetune_flows.tasks.core.data_checks import clean_rows, resolve_columns
from finetune_flows.tasks.core.ingestion import IngestOptions, IngestResult, ingest_files
from finetune_flows.tasks.core.splits import stratified_split
from finetune_flows.tasks.core.tables import read_table
from tests.conftest import NEGATIVE, POSITIVE, write_tsv

SST2_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "sst2" / "dev.tsv"


class _TopicScenario(ScenarioBase):
    """A scenario without a label mapping (any label goes) and two layouts with different columns."""

    api_version: ClassVar[int] = 1
    name: ClassVar[str] = "topic-test"
    description: ClassVar[str] = "three topics, for tests"
    head: ClassVar[str] = "sequence-classification"
    primary_metric: ClassVar[str] = "accuracy"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("plain", "text", "label"),
        DataLayout("news", "headline", "category"),
    )


@pytest.fixture
def sentiment() -> Scenario:
    return SCENARIOS.get("sentiment")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _parquet(result: IngestResult, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(result.dataset_dir) / f"{name}.parquet")


# -- read_table: formats -------------------------------------------------------------------------
# Texts chosen to trip format handling: a comma, a double quote, non-ASCII letters.
FORMAT_ROWS = [
    ("a gorgeous , witty film", 1),
    ('the "director\'s cut" is worse', 0),
    ("café scenes, naïve plot", 0),
    ("warm , funny and moving", 1),
    ("a dull , lifeless mess", 0),
    ("brilliant acting and a sharp script", 1),
    ("clumsy and stupid", 0),
    ("charming and clever", 1),
    ("cold , boring and tedious", 0),
    ("an absolute joy to watch", 1),
]


def _write_format(folder: Path, fmt: str) -> Path:
    frame = pd.DataFrame(FORMAT_ROWS, columns=["sentence", "label"])
    if fmt == "csv":
        path = folder / "data.csv"
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        path = write_tsv(folder / "data.tsv", [(t, str(lab)) for t, lab in FORMAT_ROWS])
    elif fmt == "jsonl":
        path = folder / "data.jsonl"
        lines = [json.dumps({"sentence": t, "label": lab}, ensure_ascii=False) for t, lab in FORMAT_ROWS]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "parquet":
        path = folder / "data.parquet"
        frame.to_parquet(path, index=False)
    elif fmt == "csv.gz":
        path = folder / "data.csv.gz"
        path.write_bytes(gzip.compress(frame.to_csv(index=False).encode("utf-8")))
    else:  # pragma: no cover - a typo in the parametrize list
        raise AssertionError(fmt)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "csv.gz"])
def test_read_table_reads_every_format_as_strings(tmp_path: Path, fmt: str) -> None:
    frame = read_table(_write_format(tmp_path, fmt))
    assert list(frame.columns) == ["sentence", "label"]
    assert list(frame["sentence"]) == [t for t, _ in FORMAT_ROWS]
    assert list(frame["label"]) == [str(lab) for _, lab in FORMAT_ROWS]


def test_every_format_ingests_to_the_same_data_hash(tmp_path: Path, sentiment: Scenario) -> None:
    results = {}
    for fmt in ["csv", "tsv", "jsonl", "parquet", "csv.gz"]:
        folder = tmp_path / fmt.replace(".", "_")
        folder.mkdir()
        results[fmt] = ingest_files(
            _write_format(folder, fmt), None, sentiment, IngestOptions(eval_fraction=0.2), tmp_path / "cache"
        )
    hashes = {fmt: r.data_hash for fmt, r in results.items()}
    assert len(set(hashes.values())) == 1, hashes
    assert len({r.eval_hash for r in results.values()}) == 1
    # Different files, so each was ingested rather than served from another format's cache.
    assert len({r.dataset_dir for r in results.values()}) == 5
    assert not any(r.cached for r in results.values())
    assert results["csv"].train_rows + results["csv"].eval_rows == len(FORMAT_ROWS)


# -- read_table: bad files -----------------------------------------------------------------------
def test_empty_file_is_an_error_naming_the_file(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "train.tsv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"file is empty \(file {re.escape(str(path))}\)") as info:
        read_table(path, sentiment)
    assert info.value.file == str(path)
    assert info.value.row is None


def test_empty_gzipped_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="file is empty") as info:
        read_table(path)
    assert info.value.file == str(path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.tsv"
    with pytest.raises(DataError, match="file not found") as info:
        read_table(path)
    assert info.value.file == str(path)


def test_non_utf8_byte_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\nfine text\t1\nbroken \xff here\t0\nlater\t1\n")
    with pytest.raises(
        DataError, match=rf"not valid UTF-8 .*file {re.escape(str(path))}, line 3, value 'broken "
    ) as info:
        read_table(path)
    assert info.value.file == str(path)
    assert info.value.line == 3
    assert info.value.value.startswith("broken ")


def test_non_utf8_byte_in_gzipped_csv_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(b"text,label\na,1\nb,0\nc \xfe d,1\n"))
    with pytest.raises(DataError, match=r"not valid UTF-8.*line 4") as info:
        read_table(path)
    assert info.value.line == 4


def test_invalid_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"invalid JSON.*line 3") as info:
        read_table(path)
    assert info.value.line == 3
    assert info.value.file == str(path)


def test_json_line_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n["b", 0]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"not a JSON object.*line 2") as info:
        read_table(path)
    assert info.value.line == 2


def test_json_null_text_is_reported_as_empty_text(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n', encoding="utf-8")
    frame = read_table(path)
    with pytest.raises(DataError, match=r"empty text \(file .*row 2, column 'text', value ''\)") as info:
        clean_rows(frame, path, "text", "label", sentiment)
    assert (info.value.row, info.value.column, info.value.value) == (2, "text", "")


def test_unsupported_extension_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"not a spreadsheet")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        read_table(path)


@pytest.mark.shared
def test_real_sst2_dev_file() -> None:
    if not SST2_DEV.is_file():
        pytest.skip(f"{SST2_DEV} is absent")
    frame = read_table(SST2_DEV, SCENARIOS.get("sentiment"))
    assert len(frame) == 872
    assert list(frame.columns) == ["sentence", "label"]
    assert set(frame["label"]) == {"0", "1"}


# -- resolve_columns -----------------------------------------------------------------------------
def test_resolve_columns_picks_the_sst2_layout(sentiment_files: tuple[Path, Path], sentiment: Scenario) -> None:
    train, _ = sentiment_files
    assert resolve_columns(read_table(train), train, sentiment, IngestOptions()) == ("sentence", "label")


def test_resolve_columns_picks_the_imdb_layout(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "imdb.csv"
    path.write_text("id,text,label,rating\n1,loved it,pos,9\n2,hated it,neg,2\n", encoding="utf-8")
    frame = read_table(path, sentiment)
    assert resolve_columns(frame, path, sentiment, IngestOptions()) == ("text", "label")
    cleaned = clean_rows(frame, path, "text", "label", sentiment)
    assert list(cleaned["label"]) == ["positive", "negative"]


def test_resolve_columns_uses_configured_columns(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "custom.csv"
    path.write_text("body,stars,sentence,label\nx,1,y,0\n", encoding="utf-8")
    options = IngestOptions(text_column="body", label_column="stars")
    assert resolve_columns(read_table(path), path, sentiment, options) == ("body", "stars")


def test_missing_column_lists_the_columns_found(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\ngood,1\nbad,0\n", encoding="utf-8")
    expected = r"missing column 'sentence'; columns found: \['review', 'sentiment'\].*column 'sentence'"
    with pytest.raises(DataError, match=expected) as info:
        resolve_columns(read_table(path), path, sentiment, IngestOptions())
    assert info.value.file == str(path)
    assert info.value.column == "sentence"


def test_missing_configured_column_is_named(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("body,label\ngood,1\n", encoding="utf-8")
    options = IngestOptions(text_column="review")
    with pytest.raises(DataError, match=r"missing column 'review'; columns found: \['body', 'label'\]") as info:
        resolve_columns(read_table(path), path, sentiment, options)
    assert info.value.column == "review"
    assert info.value.file == str(path)


# -- clean_rows ----------------------------------------------------------------------------------
def test_clean_rows_maps_raw_labels_and_numbers_rows(tmp_path: Path, sentiment: Scenario) -> None:
    path = write_tsv(tmp_path / "t.tsv", [("good", "1"), ("bad", "0"), ("fine", " pos ")])
    cleaned = clean_rows(read_table(path), path, "sentence", "label", sentiment)
    assert list(cleaned.columns) == ["text", "label", "row"]
    assert list(cleaned["label"]) == ["positive", "negative", "positive"]
    assert list(cleaned["row"]) == [1, 2, 3]


def test_header_only_is_an_error(tmp_path: Path, sentiment: Scenario) -> None:
    path = write_tsv(tmp_path / "train.tsv", [])
    frame = read_table(path, sentiment)
    with pytest.raises(DataError, match=rf"header only \(file {re.escape(str(path))}\)") as info:
        clean_rows(frame, path, "sentence", "label", sentiment)
    assert info.value.file == str(path)
    assert info.value.row is None


def test_empty_text_names_row_and_column(tmp_path: Path, sentiment: Scenario) -> None:
    path = write_tsv(tmp_path / "train.tsv", [("good", "1"), ("   ", "0"), ("bad", "0")])
    with pytest.raises(
        DataError, match=r"empty text \(file .*train\.tsv, row 2, column 'sentence', value '   '\)"
    ) as info:
        clean_rows(read_table(path), path, "sentence", "label", sentiment)
    assert info.value.file == str(path)
    assert (info.value.row, info.value.column, info.value.value) == (2, "sentence", "   ")


def test_empty_label_names_row_and_column(tmp_path: Path, sentiment: Scenario) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nno label at all\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty label \(file .*row 2, column 'label'") as info:
        clean_rows(read_table(path), path, "sentence", "label", sentiment)
    assert (info.value.row, info.value.column) == (2, "label")


def test_unknown_sentiment_label_names_row_column_and_value(tmp_path: Path, sentiment: Scenario) -> None:
    path = write_tsv(tmp_path / "train.tsv", [("good", "1"), ("bad", "0"), ("meh", "0"), ("odd", "2")])
    with pytest.raises(
        DataError, match=r"unknown label for scenario 'sentiment'.*row 4, column 'label', value '2'"
    ) as info:
        clean_rows(read_table(path), path, "sentence", "label", sentiment)
    assert info.value.file == str(path)
    assert (info.value.row, info.value.column, info.value.value) == (4, "label", "2")


# -- stratified_split ----------------------------------------------------------------------------
def _labels() -> pd.Series:
    # 40 "a", 20 "b", interleaved so that position says nothing about class.
    return pd.Series(["a", "a", "b"] * 20)


def test_stratified_split_keeps_class_proportions() -> None:
    labels = _labels()
    train, evaluation = stratified_split(labels, 0.25, seed=7)
    assert labels.iloc[evaluation].value_counts().to_dict() == {"a": 10, "b": 5}
    assert labels.iloc[train].value_counts().to_dict() == {"a": 30, "b": 15}
    assert set(train).isdisjoint(evaluation)
    assert sorted([*train, *evaluation]) == list(range(len(labels)))


def test_stratified_split_is_deterministic_per_seed() -> None:
    labels = _labels()
    first = stratified_split(labels, 0.25, seed=7)
    again = stratified_split(labels, 0.25, seed=7)
    other = stratified_split(labels, 0.25, seed=8)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_stratified_split_keeps_a_single_row_class_in_train() -> None:
    labels = pd.Series(["a"] * 10 + ["b"])
    train, evaluation = stratified_split(labels, 0.2, seed=0)
    assert labels.iloc[evaluation].value_counts().to_dict() == {"a": 2}
    assert 10 in train


# -- ingest_files --------------------------------------------------------------------------------
def test_ingest_with_eval_file(sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path) -> None:
    train, dev = sentiment_files
    result = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert (result.train_rows, result.eval_rows) == (96, 24)
    assert (result.duplicates_removed, result.eval_overlap_removed) == (0, 0)
    assert not result.eval_is_split
    assert (result.text_column, result.label_column) == ("sentence", "label")
    assert (result.train_file, result.eval_file) == (str(train), str(dev))
    assert Path(result.dataset_dir).parent == cache / "ingest"
    assert len(_parquet(result, "train")) == 96
    assert len(_parquet(result, "eval")) == 24


def test_label_mapping_is_sorted_and_matches_parquet(
    sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path
) -> None:
    train, dev = sentiment_files
    # "pos" first in the file, so sorting (not order of appearance) must decide the ids.
    rows = [(f"{t} again", "pos") for t in POSITIVE] + [(f"{t} again", "neg") for t in NEGATIVE]
    write_tsv(train, rows)
    result = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert result.labels == ["negative", "positive"]
    assert result.id2label == {0: "negative", 1: "positive"}
    for name in ("train", "eval"):
        part = _parquet(result, name)
        assert set(part["label"]) == {"negative", "positive"}
        expected = part["label"].map({"negative": 0, "positive": 1})
        assert part["label_id"].tolist() == expected.tolist()


def test_exact_duplicates_leave_train_and_are_counted(
    sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path
) -> None:
    train, dev = sentiment_files
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    # Three exact copies; the same text with the other label is not an exact duplicate.
    extra = [(POSITIVE[0], "1"), (POSITIVE[0], "1"), (NEGATIVE[3], "0"), (NEGATIVE[5], "1")]
    write_tsv(train, rows + extra)
    result = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert result.duplicates_removed == 3
    assert result.train_rows == 25
    part = _parquet(result, "train")
    assert not part.duplicated(subset=["text", "label"]).any()
    assert (part["text"] == POSITIVE[0]).sum() == 1
    assert (part["text"] == NEGATIVE[5]).sum() == 2


def test_eval_texts_also_in_train_are_removed_and_counted(
    sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path
) -> None:
    train, dev = sentiment_files
    train_texts = read_table(train)["sentence"].tolist()
    leaked = [(train_texts[0], "1"), (train_texts[30], "0")]
    rows = [(f"{t} in the end", "1") for t in POSITIVE] + [(f"{t} in the end", "0") for t in NEGATIVE]
    write_tsv(dev, rows + leaked)
    result = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert result.eval_overlap_removed == 2
    assert result.eval_rows == 24
    assert result.train_rows == 96
    assert set(_parquet(result, "eval")["text"]).isdisjoint(train_texts)


def test_split_without_eval_file_is_stratified_and_seeded(tmp_path: Path, sentiment: Scenario, cache: Path) -> None:
    rows = [(f"{t} {n}", "1") for t in POSITIVE for n in range(4)] + [
        (f"{t} {n}", "0") for t in NEGATIVE[:6] for n in range(4)
    ]
    path = write_tsv(tmp_path / "train.tsv", rows)  # 48 positive, 24 negative

    def split(seed: int) -> IngestResult:
        return ingest_files(path, None, sentiment, IngestOptions(eval_fraction=0.25, seed=seed), cache)

    first = split(1)
    assert first.eval_is_split
    assert first.eval_file is None
    assert _parquet(first, "eval")["label"].value_counts().to_dict() == {"positive": 12, "negative": 6}
    assert _parquet(first, "train")["label"].value_counts().to_dict() == {"positive": 36, "negative": 18}

    again = split(1)
    assert again.cached
    assert _parquet(again, "eval")["text"].tolist() == _parquet(first, "eval")["text"].tolist()
    # Not just the cache: a fresh cache folder gives the same split.
    fresh = ingest_files(path, None, sentiment, IngestOptions(eval_fraction=0.25, seed=1), tmp_path / "other")
    assert not fresh.cached
    assert fresh.eval_hash == first.eval_hash
    assert fresh.data_hash == first.data_hash

    other = split(2)
    assert other.eval_hash != first.eval_hash
    assert set(_parquet(other, "eval")["text"]) != set(_parquet(first, "eval")["text"])
    assert _parquet(other, "eval")["label"].value_counts().to_dict() == {"positive": 12, "negative": 6}


def test_max_train_rows_subsamples(sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path) -> None:
    train, dev = sentiment_files
    result = ingest_files(train, dev, sentiment, IngestOptions(max_train_rows=20), cache)
    assert result.train_rows == 20
    part = _parquet(result, "train")
    assert len(part) == 20
    assert set(part["text"]) <= set(read_table(train)["sentence"])
    assert result.eval_rows == 24
    again = ingest_files(train, dev, sentiment, IngestOptions(max_train_rows=20), cache / "fresh")
    assert _parquet(again, "train")["text"].tolist() == part["text"].tolist()


def test_second_call_is_cached_and_a_changed_byte_is_not(
    sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path
) -> None:
    train, dev = sentiment_files
    first = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    second = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert not first.cached
    assert second.cached
    assert second.dataset_dir == first.dataset_dir
    assert second.data_hash == first.data_hash
    assert second.model_copy(update={"cached": False}) == first

    raw = bytearray(train.read_bytes())
    position = raw.index(b"gorgeous")
    raw[position] = ord("G")
    train.write_bytes(bytes(raw))
    changed = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert not changed.cached
    assert changed.dataset_dir != first.dataset_dir
    assert changed.data_hash != first.data_hash
    assert Path(first.dataset_dir, "meta.json").is_file()


def test_other_options_are_not_served_from_the_cache(
    sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path
) -> None:
    train, dev = sentiment_files
    first = ingest_files(train, dev, sentiment, IngestOptions(), cache)
    other = ingest_files(train, dev, sentiment, IngestOptions(max_train_rows=10), cache)
    assert not other.cached
    assert other.dataset_dir != first.dataset_dir


# -- ingest_files: bad data ----------------------------------------------------------------------
def test_ingest_empty_train_file(tmp_path: Path, sentiment: Scenario, cache: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="file is empty") as info:
        ingest_files(path, None, sentiment, IngestOptions(), cache)
    assert info.value.file == str(path)
    assert not (cache / "ingest").exists()


def test_ingest_header_only_eval_file(sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path) -> None:
    train, dev = sentiment_files
    write_tsv(dev, [])
    with pytest.raises(DataError, match=rf"header only \(file {re.escape(str(dev))}\)") as info:
        ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert info.value.file == str(dev)


def test_one_class_only_is_an_error(sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path) -> None:
    train, dev = sentiment_files
    write_tsv(train, [(t, "1") for t in POSITIVE])
    with pytest.raises(DataError, match=r"only one class.*column 'label', value 'positive'") as info:
        ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert info.value.file == str(train)
    assert (info.value.column, info.value.value) == ("label", "positive")


def test_unknown_label_in_eval_file(sentiment_files: tuple[Path, Path], sentiment: Scenario, cache: Path) -> None:
    train, dev = sentiment_files
    write_tsv(dev, [("fine", "1"), ("awful", "0"), ("so so", "2")])
    with pytest.raises(
        DataError, match=rf"unknown label.*file {re.escape(str(dev))}, row 3, column 'label', value '2'"
    ) as info:
        ingest_files(train, dev, sentiment, IngestOptions(), cache)
    assert (info.value.file, info.value.row, info.value.column, info.value.value) == (
        str(dev),
        3,
        "label",
        "2",
    )


def test_eval_label_that_train_lacks(tmp_path: Path, cache: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\nstocks rise,business\ngoal scored,sport\nmarkets fall,business\n", encoding="utf-8")
    dev = tmp_path / "dev.csv"
    dev.write_text("headline,category\nbonds slip,business\nnew phone out,tech\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=rf"training data lacks.*file {re.escape(str(dev))}, row 2, column 'category', value 'tech'",
    ) as info:
        ingest_files(train, dev, _TopicScenario(), IngestOptions(), cache)
    err = info.value
    assert (err.file, err.row, err.column, err.value) == (str(dev), 2, "category", "tech")


def test_non_utf8_train_file_through_ingest(tmp_path: Path, sentiment: Scenario, cache: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff film\t0\n")
    with pytest.raises(DataError, match=r"not valid UTF-8.*line 3") as info:
        ingest_files(path, None, sentiment, IngestOptions(), cache)
    assert (info.value.file, info.value.line) == (str(path), 3)


def test_same_bytes_in_another_format_are_not_served_from_the_cache(tmp_path: Path) -> None:
    """A file's format is part of the cache key: the same bytes parse differently as CSV and TSV."""
    text = "text\tlabel\n" + "".join(f'"{t}, really"\t1\n' for t in POSITIVE)
    text += "".join(f'"{t}, really"\t0\n' for t in NEGATIVE)
    as_tsv, as_csv = tmp_path / "data.tsv", tmp_path / "data.csv"
    as_tsv.write_text(text, encoding="utf-8")
    as_csv.write_text(text, encoding="utf-8")
    scenario = SCENARIOS.get("sentiment")
    tsv = ingest_files(as_tsv, None, scenario, IngestOptions(), tmp_path / "cache")
    assert tsv.text_column == "text"
    with pytest.raises(DataError, match="missing column"):  # one column 'text\tlabel' when read as CSV
        ingest_files(as_csv, None, scenario, IngestOptions(), tmp_path / "cache")
