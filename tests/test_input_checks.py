"""Checks before any training (issue 11, item 4): repeated column names, control characters, broken gzip and
Parquet files, and a registry-unsafe model name are errors naming file, row, column and value."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune_flows.plugins import SCENARIOS, ConfigError, DataError
from finetune_flows.tasks.core.config import FinetuneConfig, parse_overrides
from finetune_flows.tasks.core.data_checks import clean_rows
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.sections import RegistrationConfig
from finetune_flows.tasks.core.tables import read_table
from tests.conftest import NEGATIVE, POSITIVE, run_cli, services_environment, write_tsv

ROWS = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]


def _csv_lines(header: str) -> str:
    return header + "\n" + "".join(f'"{text}",{label},{label}\n' for text, label in ROWS)


# -- 1. repeated column names ----------------------------------------------------------------------


def test_a_csv_header_naming_a_column_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text(_csv_lines("text,text,label"), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"duplicate column name 'text' in the header \['text', 'text', 'label'\]"
    ) as exc:
        read_table(path)
    assert exc.value.file == str(path) and exc.value.column == "text"
    assert f"(file {path}, column 'text')" in str(exc.value)


def test_a_repeated_column_name_is_found_in_tsv_gzip_and_after_blank_lines(tmp_path: Path) -> None:
    tsv = write_tsv(tmp_path / "dup.tsv", ROWS, header="sentence\tlabel\tsentence")
    gz = tmp_path / "dup.csv.gz"
    gz.write_bytes(gzip.compress(("\n\n" + _csv_lines("label,text,label")).encode()))
    for path, column in ((tsv, "sentence"), (gz, "label")):
        with pytest.raises(DataError, match=rf"duplicate column name '{column}'.*\(file {re.escape(str(path))}"):
            read_table(path)


def test_a_jsonl_object_repeating_a_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text('{"text": "fine", "label": "1"}\n{"text": "a", "text": "b", "label": "0"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"duplicate key in a JSON object \(file {re.escape(str(path))}, line 2, "
                       r"column 'text', value '\{\"text\": \"a\""):  # fmt: skip
        read_table(path)


def test_a_parquet_file_naming_a_column_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"]), pa.array(["1"])], names=["text", "text", "label"]), path)
    with pytest.raises(DataError, match=rf"duplicate column name 'text'.*\(file {re.escape(str(path))}, column 'text'"):
        read_table(path)


def test_distinct_columns_still_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "ok.csv"
    path.write_text(_csv_lines("text,label,other"), encoding="utf-8")
    assert list(read_table(path).columns) == ["text", "label", "other"]
    path.write_text("text,label,,\na,1,,\n", encoding="utf-8")  # a spreadsheet export's empty trailing columns
    assert list(read_table(path).columns) == ["text", "label", "Unnamed: 2", "Unnamed: 3"]


# -- 2. control characters -----------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f"])
def test_a_control_character_in_a_text_names_file_row_column_and_value(tmp_path: Path, char: str) -> None:
    path = tmp_path / "train.csv"
    frame = pd.DataFrame({"sentence": ["fine text", f"bad{char}text", "also fine"], "label": ["1", "0", "1"]})
    with pytest.raises(DataError) as exc:
        clean_rows(frame, path, "sentence", "label", SCENARIOS.get("sentiment"))
    assert str(exc.value).startswith(f"control character {char!r} at position 3 (file {path}, row 2, column")
    assert f"column 'sentence', value {f'bad{char}text'!r})" in str(exc.value)


def test_tab_newline_and_carriage_return_are_allowed(tmp_path: Path) -> None:
    frame = pd.DataFrame({"sentence": ["a\ttab", "a\nnewline", "a\r\ncrlf"], "label": ["1", "0", "1"]})
    cleaned = clean_rows(frame, tmp_path / "t.csv", "sentence", "label", SCENARIOS.get("sentiment"))
    assert list(cleaned["text"]) == ["a\ttab", "a\nnewline", "a\r\ncrlf"]


def test_a_nul_byte_in_a_file_fails_at_ingest(tmp_path: Path) -> None:
    train = write_tsv(tmp_path / "train.tsv", [*ROWS[:5], ("nul\x00inside", "1"), *ROWS[5:]])
    with pytest.raises(DataError, match=rf"control character '\\x00' at position 3 \(file {re.escape(str(train))}, "
                       r"row 6, column 'sentence', value 'nul\\x00inside'\)"):  # fmt: skip
        ingest_files(train, None, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")


def test_a_control_character_in_a_label_is_named_too(tmp_path: Path) -> None:
    frame = pd.DataFrame({"sentence": ["fine", "fine too"], "label": ["1", "0\x07"]})
    with pytest.raises(DataError, match=r"control character '\\x07' .*row 2, column 'label', value '0\\x07'"):
        clean_rows(frame, tmp_path / "t.csv", "sentence", "label", SCENARIOS.get("sentiment"))


# -- 3. files that are not what their suffix says ----------------------------------------------------


def test_a_gz_file_that_is_not_gzip_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train.csv.gz"
    path.write_text(_csv_lines("text,label,x"), encoding="utf-8")
    with pytest.raises(
        DataError, match=rf"not a valid gzip file \(Not a gzipped file .*\(file {re.escape(str(path))}\)"
    ):
        read_table(path)


def test_a_truncated_gzip_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv.gz"
    path.write_bytes(gzip.compress(_csv_lines("text,label,x").encode())[:-12])
    with pytest.raises(DataError, match=rf"not a valid gzip file .*\(file {re.escape(str(path))}\)"):
        read_table(path)


@pytest.mark.parametrize("content", [b"text,label\nnot parquet,1\n", b"PAR1" + b"\x00" * 40 + b"PAR1"])
def test_an_unreadable_parquet_file_is_a_data_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"cannot read as Parquet \(.*\(file {re.escape(str(path))}\)"):
        read_table(path)


# -- 4. the model name ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../evil/x", "a/b", "..", "a..b", ".hidden", "name with space", "x:1", "ünï"])
def test_a_model_name_that_is_not_registry_safe_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=r"registration\.model_name.*may hold only letters, digits"):
        FinetuneConfig.for_scenario("sentiment", parse_overrides([f"registration.model_name={name}"]))


@pytest.mark.parametrize("name", ["sentiment", "my-model_2.v1", "A", "finance-monitoring"])
def test_plain_model_names_are_accepted(name: str) -> None:
    assert RegistrationConfig(model_name=name).model_name == name


def test_the_cli_refuses_an_unsafe_model_name_before_anything_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run_cli(services_environment(state), "run", "sentiment", "--set", "registration.model_name=../../evil/x")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert (
        "finetune-flows: error: invalid configuration: registration.model_name: Value error, a registered model name "
        "may hold only letters, digits, '-', '_' and '.', start with a letter or digit, and not contain '..'; "
        "got '../../evil/x'"
    ) in result.stderr
    assert not (state / "runs").exists() and not (state / "mlflow.db").exists()


CLI_CASES = {
    "dup.csv": (b"text,text,label\na,b,1\n", "duplicate column name 'text' in the header ['text', 'text', 'label'] "
                "(file {path}, column 'text')"),
    "nul.csv": (b"sentence,label\ngood one,1\nnul\x00inside,0\n", "control character '\\x00' at position 3 "
                "(file {path}, row 2, column 'sentence', value 'nul\\x00inside')"),
    "bad.csv.gz": (b"text,label\nx,1\n", "not a valid gzip file (Not a gzipped file (b'te')) (file {path})"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_the_cli_names_the_bad_input_and_registers_nothing(tmp_path: Path, name: str, prefect_harness: str) -> None:
    content, message = CLI_CASES[name]
    state, train = tmp_path / "state", tmp_path / name
    train.write_bytes(content)
    env = services_environment(state, prefect_harness)
    result = run_cli(env, "run", "sentiment", "--data", str(train), timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"finetune-flows: error: {message.format(path=train)}" in result.stderr, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    assert client.search_registered_models() == [] and client.search_model_versions() == []
