"""Reading labelled tables: CSV, TSV, JSONL and Parquet (each optionally gzipped) as strict UTF-8.

Every problem is a ``DataError`` naming file, row (or line), column and value. A scenario may
read its own formats (``Scenario.read_file``); everything else goes through ``read_table``.

Size caps (``data.max_file_mb``, ``data.max_rows``, ``data.max_text_bytes``) are checked while reading, before
anything tokenizes: the file's size on disk before a byte is read (and a ``.gz`` file's decompressed size), the
rows once parsed, the UTF-8 bytes of every text cell in ``clean_rows``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from finetune_flows.plugins import DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.plugins.specs import Scenario

# C0 control characters except tab, newline and carriage return: never part of a real text (NUL often marks a
# binary or UTF-16 file), so an error rather than a silent clean-up.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
MB = 1 << 20
DEFAULT_MAX_FILE_MB = 2048.0
"""The file-size cap of readers that take no configuration (``data.max_file_mb``'s default)."""
VALUE_PREFIX = 40
"""Characters of an oversized text shown in its error."""


class ColumnChoice(Protocol):
    """The part of the ingest options that picks columns."""

    text_column: str | None
    label_column: str | None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(
    path: Path,
    scenario: Scenario | None = None,
    *,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Read one file into a DataFrame of strings; the scenario may read its own formats.

    A file over ``max_file_mb`` (on disk, or a ``.gz`` file decompressed) or with more than ``max_rows`` data rows
    is a ``DataError`` naming it; the size is checked before the file is read."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    size = path.stat().st_size
    if size == 0:
        raise DataError("file is empty", file=path, hint="Give a file with a header and data rows")
    if size > max_file_mb * MB:
        raise DataError(
            f"file of {size:,} bytes is larger than data.max_file_mb ({max_file_mb:g} MB, {int(max_file_mb * MB):,} "
            "bytes)",
            file=path,
            hint="Raise data.max_file_mb, or split or sample the file",
        )
    if scenario is not None:
        custom = scenario.read_file(path)
        if custom is not None:
            return _within_rows(path, custom, max_rows)
    return _within_rows(path, _read_known_format(path, max_file_mb, max_rows), max_rows)


def _within_rows(path: Path, frame: pd.DataFrame, max_rows: int | None) -> pd.DataFrame:
    if max_rows is not None and len(frame) > max_rows:
        raise DataError(
            f"{len(frame):,} data rows, more than data.max_rows ({max_rows:,})",
            file=path,
            hint="Raise data.max_rows, or split or sample the file",
        )
    return frame


def _read_known_format(path: Path, max_file_mb: float, max_rows: int | None) -> pd.DataFrame:
    """A CSV, TSV, JSONL or Parquet file (optionally gzipped) as a frame of strings, by its suffixes."""
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) > 1 else suffixes[-1] if suffixes else ""
    raw = path.read_bytes()
    if compressed:
        raw = _gunzip(path, raw, int(max_file_mb * MB))
    if not raw.strip():
        raise DataError("file is empty", file=path, hint="Give a file with a header and data rows")
    if kind == ".parquet":
        frame = _read_parquet(path, raw)
        return frame.astype({c: "string" for c in frame.columns}).fillna("")
    text = decode_utf8(path, raw)
    try:
        if kind == ".tsv":  # GLUE-style TSV: quotes are ordinary characters
            header = next((line for line in text.splitlines() if line.strip()), "")
            _unique_columns(path, header.split("\t"))
            return pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
        if kind in {".csv", ".txt"}:
            _unique_columns(path, next((row for row in csv.reader(io.StringIO(text, newline="")) if row), []))
            return pd.read_csv(io.StringIO(text), sep=",", dtype=str, keep_default_na=False)
        if kind in {".jsonl", ".ndjson", ".json"}:
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line, object_pairs_hook=_one_value_per_key)
                    except _RepeatedKey as exc:
                        raise DataError(
                            "duplicate key in a JSON object", file=path, line=number, column=exc.key, value=line
                        ) from exc
                    except json.JSONDecodeError as exc:
                        raise DataError(f"invalid JSON: {exc.msg}", file=path, line=number, value=line) from exc
                    if not isinstance(record, dict):
                        raise DataError("not a JSON object", file=path, line=number, value=line)
                    rows.append(record)
                    if max_rows is not None and len(rows) > max_rows:  # stop reading as soon as it is over
                        raise DataError(
                            f"more than data.max_rows ({max_rows:,}) data rows",
                            file=path,
                            line=number,
                            hint="Raise data.max_rows, or split or sample the file",
                        )
            # object dtype keeps 1 as "1" (not "1.0") when a key is missing; null/missing -> "".
            return pd.DataFrame(rows, dtype=object).fillna("").astype(str)
    except (pd.errors.ParserError, csv.Error) as exc:
        raise DataError(f"cannot parse: {exc}", file=path) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty", file=path) from exc
    raise DataError(
        f"unsupported file type {kind!r}",
        file=path,
        hint="Use .csv, .tsv, .jsonl or .parquet (optionally .gz)",
    )


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _one_value_per_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a JSON object that repeats a key is an error (json keeps the last value silently)."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def _unique_columns(path: Path, header: list[str]) -> None:
    """A header that names a column twice is an error (pandas would silently rename the second to ``name.1``).

    Empty names (trailing commas of a spreadsheet export) become distinct ``Unnamed: n`` columns and are allowed."""
    seen: set[str] = set()
    for name in header:
        if name in seen and name.strip():
            raise DataError(
                f"duplicate column name {name!r} in the header {header}",
                file=path,
                column=name,
                hint="Give every column a different name",
            )
        seen.add(name)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _gunzip(path: Path, raw: bytes, limit: int) -> bytes:
    """The decompressed bytes of a ``.gz`` file, at most ``limit`` of them; a file that is not (complete) gzip, or
    that decompresses to more, is a ``DataError``."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            data = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"not a valid gzip file ({_one_line(exc)})", file=path, hint="Compress it with gzip, or drop the .gz suffix"
        ) from exc
    if len(data) > limit:
        raise DataError(
            f"decompresses to more than data.max_file_mb ({limit / MB:g} MB, {limit:,} bytes)",
            file=path,
            hint="Raise data.max_file_mb, or split or sample the file",
        )
    return data


def _read_parquet(path: Path, raw: bytes) -> pd.DataFrame:
    """A Parquet file as a frame; an unreadable file or a repeated column name is a ``DataError``."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        _unique_columns(path, list(pq.read_schema(io.BytesIO(raw)).names))
        return pd.read_parquet(io.BytesIO(raw))
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"cannot read as Parquet ({_one_line(exc)})", file=path, hint="Check that it is a Parquet file"
        ) from exc


def resolve_columns(frame: pd.DataFrame, path: Path, scenario: Scenario, options: ColumnChoice) -> tuple[str, str]:
    """The (text, label) columns: as configured, else the first scenario layout that fits."""
    found = list(frame.columns)
    if options.text_column or options.label_column:
        wanted = [options.text_column or "text", options.label_column or "label"]
    else:
        for layout in scenario.layouts:
            if layout.text_column in found and layout.label_column in found:
                return layout.text_column, layout.label_column
        wanted = [scenario.layouts[0].text_column, scenario.layouts[0].label_column]
        known = ", ".join(f"{lay.name}: ({lay.text_column}, {lay.label_column})" for lay in scenario.layouts)
        missing = next(c for c in wanted if c not in found) if any(c not in found for c in wanted) else wanted[0]
        raise DataError(
            f"missing column {missing!r}; columns found: {found}; scenario {scenario.name!r} knows {known}",
            file=path,
            column=missing,
            hint="Set data.text_column and data.label_column",
        )
    for column in wanted:
        if column not in found:
            raise DataError(f"missing column {column!r}; columns found: {found}", file=path, column=column)
    return wanted[0], wanted[1]


def clean_rows(
    frame: pd.DataFrame,
    path: Path,
    text_col: str,
    label_col: str,
    scenario: Scenario,
    label_map: Mapping[str, str] | None = None,
    max_text_bytes: int | None = None,
) -> pd.DataFrame:
    """Validate every row; return columns ``text`` and ``label`` (the label's name).

    ``label_map`` (raw value -> label name) is applied first; a raw value it does not list must be
    a label the scenario knows. A text of more than ``max_text_bytes`` UTF-8 bytes is an error."""
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    label_map = label_map or {}
    texts = frame[text_col].astype(str)
    labels = frame[label_col].astype(str).str.strip()
    if max_text_bytes is not None:
        _texts_within(texts, path, text_col, max_text_bytes)
    for column, values in ((text_col, texts), (label_col, labels)):
        control = values.str.contains(CONTROL_CHARACTERS, regex=True)
        if control.any():
            row = int(control.to_numpy().argmax()) + 1
            value = values.iloc[row - 1]
            found = CONTROL_CHARACTERS.search(value)
            where = f"{found.group()!r} at position {found.start()}" if found else ""
            raise DataError(
                f"control character {where}",
                file=path,
                row=row,
                column=column,
                value=value,
                hint="Remove NUL and other control characters (tab, newline and carriage return are allowed)",
            )
    for row, (text, label) in enumerate(zip(texts, labels, strict=True), start=1):
        if not text.strip():
            raise DataError("empty text", file=path, row=row, column=text_col, value=text)
        if not label:
            raise DataError("empty label", file=path, row=row, column=label_col, value=label)
        if scenario.label_names and label not in scenario.label_names and label not in label_map:
            mapped = f"; data.label_map maps {sorted(label_map)}" if label_map else ""
            raise DataError(
                f"unknown label for scenario {scenario.name!r}; known: {sorted(set(scenario.label_names))}{mapped}",
                file=path,
                row=row,
                column=label_col,
                value=label,
                hint="Map it to one of the scenario's labels with data.label_map (e.g. '0:negative')",
            )
    if label_map:
        names = {**scenario.label_names, **label_map}
        labels = labels.map(lambda raw: names.get(raw, raw))
    elif scenario.label_names:
        labels = labels.map(scenario.label_names)
    return pd.DataFrame({"text": texts.to_numpy(), "label": labels.to_numpy(), "row": np.arange(1, len(frame) + 1)})


def _texts_within(texts: pd.Series, path: Path, column: str, max_bytes: int) -> None:
    """Every text holds at most ``max_bytes`` UTF-8 bytes; the first that holds more is a ``DataError`` showing
    its start and size (a UTF-8 character has at most 4 bytes, so only texts over ``max_bytes // 4`` characters
    are encoded to count)."""
    for position in np.flatnonzero((texts.str.len() > max_bytes // 4).to_numpy()):
        text = str(texts.iloc[position])
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > max_bytes:
            raise DataError(
                f"text of {size:,} UTF-8 bytes, more than data.max_text_bytes ({max_bytes:,}); the value shown is "
                f"its first {VALUE_PREFIX} characters",
                file=path,
                row=int(position) + 1,
                column=column,
                value=text[:VALUE_PREFIX] + ("..." if len(text) > VALUE_PREFIX else ""),
                hint="Shorten or drop the row, or raise data.max_text_bytes",
            )


def read_label_map(path: Path) -> dict[str, str]:
    """A label map file: a JSON object ``{raw: label}`` or a CSV with a header and two columns (raw, label)."""
    if not path.is_file():
        raise DataError("label map file not found", file=path)
    text = decode_utf8(path, path.read_bytes())
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
        if not isinstance(loaded, dict) or not all(isinstance(v, str | int) for v in loaded.values()):
            raise DataError("expected a JSON object of raw label -> label name", file=path, value=loaded)
        pairs = {str(k).strip(): str(v).strip() for k, v in loaded.items()}
    else:
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"cannot parse: {exc}", file=path) from exc
        if frame.shape[1] != 2:
            raise DataError(f"expected 2 columns (raw, label), found {list(frame.columns)}", file=path)
        pairs = {}
        for row, (raw, name) in enumerate(frame.itertuples(index=False, name=None), start=1):
            raw, name = str(raw).strip(), str(name).strip()
            if not raw or not name or pairs.get(raw, name) != name:
                raise DataError("empty or repeated raw label", file=path, row=row, value=f"{raw},{name}")
            pairs[raw] = name
    if not pairs:
        raise DataError("the label map is empty", file=path)
    return pairs


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` as dicts with string keys (the shape Prefect's table artifacts take)."""
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]
