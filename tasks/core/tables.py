"""Reading labelled tables: CSV, TSV, JSONL and Parquet (each optionally gzipped) as strict UTF-8.

Every problem is a ``DataError`` naming file, row (or line), column and value. A scenario may
read its own formats (``Scenario.read_file``); everything else goes through ``read_table``. The rows
read are checked by ``data_checks``; label map files are read here too (``read_label_map``).

Size caps (``data.max_file_mb``, ``data.max_rows``, ``data.max_text_bytes``) are checked while reading, before
anything tokenizes: the file's size on disk before a byte is read (and a ``.gz`` file's decompressed size), the
rows once parsed, the UTF-8 bytes of every text cell in ``data_checks.clean_rows``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import zlib
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_flows.plugins import DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.plugins.specs import Scenario

MB = 1 << 20
DEFAULT_MAX_FILE_MB = 2048.0
"""The file-size cap of readers that take no configuration (``data.max_file_mb``'s default)."""


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
