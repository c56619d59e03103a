"""Formula-safe report CSVs (issue 11, item 5): a string cell a spreadsheet would run as a formula is written with a
leading ``'``; every other cell, numbers included, comes back as it went in. Each writer is read back with pandas
and with the ``csv`` module."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from finetune_flows.plugins import DataError
from finetune_flows.tasks.core.reports import formula_safe, safe_cell, write_csv
from finetune_flows.tasks.monitoring.batch_records import BadRecord, write_error_report
from finetune_flows.tasks.ranking.dataset import prepare_folder
from finetune_flows.tasks.ranking.recommending import write_frame
from finetune_flows.tasks.ranking.split import SplitOptions

DANGEROUS = ['=HYPERLINK("http://x")', "@SUM(A1)", "+1-2", "-2+3", "\tlead tab", "\rlead cr"]
HARMLESS = ["plain text", "a = b", "x-1", "", "'quoted already", "email@example.com"]


def csv_cells(path: Path, column: str) -> list[str]:
    """The cells of ``column`` as the ``csv`` module reads them (no type conversion)."""
    with path.open(encoding="utf-8", newline="") as fh:
        return [row[column] for row in csv.DictReader(fh)]


def assert_neutralised(cells: list[str]) -> None:
    assert cells == [*(f"'{c}" for c in DANGEROUS), *HARMLESS], cells


def test_safe_cell_prefixes_only_strings_that_start_a_formula() -> None:
    assert [safe_cell(c) for c in DANGEROUS] == [f"'{c}" for c in DANGEROUS]
    assert [safe_cell(c) for c in HARMLESS] == HARMLESS
    assert [safe_cell(v) for v in (-0.5, -3, 2.0, None, True)] == [-0.5, -3, 2.0, None, True]


def test_write_csv_neutralises_string_cells_and_keeps_numbers(tmp_path: Path) -> None:
    texts = DANGEROUS + HARMLESS
    frame = pd.DataFrame(
        {
            "text": texts,
            "score": [-0.5 + i for i in range(len(texts))],
            "rank": [-i for i in range(len(texts))],
            "mixed": pd.Series([-1.5, "-1+2"] + ["ok"] * (len(texts) - 2), dtype=object),
        }
    )
    path = write_csv(frame, tmp_path / "sub" / "report.csv")
    assert_neutralised(csv_cells(path, "text"))
    back = pd.read_csv(path, keep_default_na=False)
    assert_neutralised(list(back["text"]))
    assert list(back["score"]) == list(frame["score"]) and back["score"].dtype == "float64"
    assert list(back["rank"]) == list(frame["rank"]) and back["rank"].dtype == "int64"
    assert csv_cells(path, "mixed")[:2] == ["-1.5", "'-1+2"]
    assert frame["text"].tolist() == texts  # the caller's frame is not changed


def test_formula_safe_handles_pandas_string_dtypes() -> None:
    frame = pd.DataFrame({"s": pd.Series(["=1", None, "ok"], dtype="string"), "n": [-1.0, 0.0, 1.0]})
    safe = formula_safe(frame)
    assert safe["s"].tolist()[0] == "'=1" and pd.isna(safe["s"].tolist()[1]) and safe["s"].tolist()[2] == "ok"
    assert safe["n"].tolist() == [-1.0, 0.0, 1.0]


def test_the_monitor_error_report_is_formula_safe(tmp_path: Path) -> None:
    values = DANGEROUS + HARMLESS
    bad = [
        BadRecord(file="/batch/a.csv", row=i + 1, line=i + 2, column="timestamp", value=v, problem="bad timestamp")
        for i, v in enumerate(values)
    ]
    path = write_error_report(bad, tmp_path / "errors" / "errors-1.csv")
    assert_neutralised(csv_cells(path, "value"))
    back = pd.read_csv(path, keep_default_na=False)
    assert_neutralised(list(back["value"]))
    assert list(back["row"]) == list(range(1, len(values) + 1)) and back["row"].dtype == "int64"
    assert set(back["problem"]) == {"bad timestamp"} and set(back["file"]) == {"/batch/a.csv"}


def test_top_k_lists_are_formula_safe_as_csv_and_exact_as_parquet(tmp_path: Path) -> None:
    texts = DANGEROUS + HARMLESS
    lists = pd.DataFrame(
        {
            "user": ["-u1"] * len(texts),
            "rank": range(1, len(texts) + 1),
            "item": [f"i{i}" for i in range(len(texts))],
            "score": [-0.25] * len(texts),
            "text": texts,
        }
    )
    write_frame(lists, tmp_path / "top.csv")
    assert_neutralised(csv_cells(tmp_path / "top.csv", "text"))
    back = pd.read_csv(tmp_path / "top.csv", keep_default_na=False)
    assert_neutralised(list(back["text"]))
    assert set(back["user"]) == {"'-u1"} and set(back["score"]) == {-0.25}
    write_frame(lists, tmp_path / "top.parquet")  # a data file, not a spreadsheet report: kept exact
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "top.parquet"), lists)


def test_the_ranking_input_report_and_skipped_users_are_formula_safe(log_folder: Path, tmp_path: Path) -> None:
    interactions = log_folder / "interactions.csv"
    rows = [f"u0,s{i},{value},5000" for i, value in enumerate(DANGEROUS)]
    rows += ["@evil,s1,5,10", "@evil,s2,5,11"]  # a user with too few positives: listed in skipped_users.csv
    with interactions.open("a", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(row.split(",") for row in rows)
    data = prepare_folder(log_folder, SplitOptions(negatives=3), max_tags=5, cache_dir=tmp_path / "cache")
    problems = Path(data.dataset_dir) / "problems.csv"
    cells = zip(csv_cells(problems, "column"), csv_cells(problems, "value"), strict=True)
    assert [value for column, value in cells if column == "rating"] == ["great", *(f"'{c}" for c in DANGEROUS)]
    back = pd.read_csv(problems, dtype=str, keep_default_na=False)
    assert list(back.loc[back["column"] == "rating", "value"]) == ["great", *(f"'{c}" for c in DANGEROUS)]
    assert "x999" in set(back["value"])  # other bad values are reported as they were
    skipped = Path(data.dataset_dir) / "skipped_users.csv"
    assert "'@evil" in csv_cells(skipped, "user") and "'@evil" in set(pd.read_csv(skipped, dtype=str)["user"])
    assert all(not u.startswith("'") for u in csv_cells(skipped, "user") if u != "'@evil")


@pytest.mark.usefixtures("prefect_harness")
def test_the_monitor_flow_writes_a_formula_safe_error_report(state_dir: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.monitor import monitor
    from finetune_flows.tasks.monitoring.scoring import MonitorConfig

    stamps = [*DANGEROUS[:4], "next tuesday"]  # the batch reader strips a leading tab or CR from timestamps
    batch = tmp_path / "batch.csv"
    pd.DataFrame({"timestamp": stamps, "source": "wire", "text": "Bank A"}).to_csv(batch, index=False)
    with pytest.raises(DataError, match=r"no good record in the batch \(5 bad"):
        monitor(MonitorConfig(source=str(batch)))
    (report,) = (state_dir.resolve() / "monitor" / "finance-monitoring" / "errors").glob("errors-*.csv")
    expected = [*(f"'{c}" for c in DANGEROUS[:4]), "next tuesday"]
    assert csv_cells(report, "value") == expected
    assert list(pd.read_csv(report, keep_default_na=False)["value"]) == expected
