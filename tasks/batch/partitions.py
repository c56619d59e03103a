"""Input partitions of a file or folder of texts: Parquet row ranges, CSV and JSONL byte ranges.

``plan_partitions`` reads each file once: it hashes the bytes, checks every record (a text in
the text column that is a non-empty string; CSV rows with the header's field count; JSONL lines
that are JSON objects; strict UTF-8) and cuts the file into ranges of at most ``rows`` records.
A bad record is a ``DataError`` naming its file, row, line, column and value before anything is
scored. A partition's id is the file's content hash plus its row range, so a rerun over the same
bytes plans the same ids and a changed file plans new ones. ``read_partition`` reads one range
back: a CSV or JSONL range by its byte offsets (a CSV range gets the header prepended, every
column read as text), a Parquet range by the row groups that hold it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins.errors import DataError
from finetune_flows.plugins.readers import decode_utf8

SUFFIXES = (".parquet", ".csv", ".jsonl")
Format = Literal["parquet", "csv", "jsonl"]


class Partition(BaseModel):
    """Rows ``start`` (0-based, inclusive) to ``stop`` (exclusive) of one input file."""

    model_config = ConfigDict(frozen=True)

    id: str
    file: str
    format: Format
    text_column: str
    start: int
    stop: int
    byte_start: int = 0  # CSV and JSONL: where the range's first record starts
    byte_stop: int = 0
    header_bytes: int = 0  # CSV: the header's length, prepended to the range when read

    @property
    def rows(self) -> int:
        """Records in the partition."""
        return self.stop - self.start


def input_files(source: Path) -> list[Path]:
    """``source`` itself, or the Parquet, CSV and JSONL files anywhere below the folder ``source`` (sorted)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(
                "no Parquet, CSV or JSONL files in folder", file=source, hint="Name them *.parquet, *.csv or *.jsonl"
            )
        return files
    if not source.is_file():
        raise DataError("input file or folder not found", file=source)
    if source.suffix.lower() not in SUFFIXES:
        raise DataError(
            "unsupported input file type", file=source, value=source.suffix, hint="Use .parquet, .csv or .jsonl"
        )
    return [source]


def file_hash(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _check_text(value: object, path: Path, row: int, column: str, line: int | None = None) -> None:
    if isinstance(value, str) and value.strip():
        return
    problem = (
        "missing text (null)" if value is None else "empty text" if isinstance(value, str) else "text is not a string"
    )
    raise DataError(problem, file=path, row=row, line=line, column=column, value=value)


def _ranges(ends: list[int], rows: int) -> Iterator[tuple[int, int]]:
    """(first, last+1) record index ranges of at most ``rows`` records over ``len(ends)`` records."""
    for start in range(0, len(ends), rows):
        yield start, min(start + rows, len(ends))


def _byte_partitions(
    path: Path, fmt: Format, column: str, ends: list[int], first: int, header: int, rows: int
) -> list[Partition]:
    """Partitions over records whose byte ends are ``ends``; the first record starts at ``first``."""
    digest = file_hash(path)
    out = []
    for start, stop in _ranges(ends, rows):
        begin = first if start == 0 else ends[start - 1]
        out.append(
            Partition(
                id=f"{digest}-{start}-{stop}", file=str(path), format=fmt, text_column=column, start=start, stop=stop,
                byte_start=begin, byte_stop=ends[stop - 1], header_bytes=header,
            )
        )  # fmt: skip
    return out


def _lines(data: bytes, ends: list[int], start: int) -> Iterator[str]:
    """Decoded lines of ``data`` from offset ``start``, recording in ``ends`` where each line ends."""
    position = start
    for raw in data[start:].splitlines(keepends=True):
        position += len(raw)
        ends.append(position)
        yield raw.decode("utf-8")


def _plan_csv(path: Path, data: bytes, column: str, rows: int) -> list[Partition]:
    decode_utf8(path, data)  # a bad byte names its line
    first = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    line_ends: list[int] = []
    reader = csv.reader(_lines(data, line_ends, first))
    header = next(reader, [])
    if column not in header:
        raise DataError(f"no text column {column!r}; columns found: {header}", file=path, line=1, column=column)
    header_bytes, index = line_ends[-1] if line_ends else first, header.index(column)
    record_ends, row, last = [], 0, reader.line_num
    for fields in reader:
        line, last = last + 1, reader.line_num  # where the record starts
        if not fields:
            continue  # a blank line is not a row (pandas skips it too)
        row += 1
        if len(fields) != len(header):
            problem = f"expected {len(header)} fields, got {len(fields)}"
            raise DataError(problem, file=path, row=row, line=line, value=",".join(fields))
        _check_text(fields[index], path, row, column, line=line)
        record_ends.append(line_ends[-1])
    return _byte_partitions(path, "csv", column, record_ends, header_bytes, header_bytes, rows)


def _plan_jsonl(path: Path, data: bytes, column: str, rows: int) -> list[Partition]:
    decode_utf8(path, data)
    position = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    first, row = position, 0
    record_ends: list[int] = []
    for line, raw in enumerate(data[position:].splitlines(keepends=True), start=1):
        position += len(raw)
        if not raw.strip():
            if not record_ends:
                first = position
            continue
        row += 1
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", file=path, row=row, line=line, value=raw.decode()) from exc
        if not isinstance(record, dict):
            raise DataError("not a JSON object", file=path, row=row, line=line, value=raw.decode())
        _check_text(record.get(column), path, row, column, line=line)
        record_ends.append(position)
    return _byte_partitions(path, "jsonl", column, record_ends, first, 0, rows)


def _plan_parquet(path: Path, column: str, rows: int) -> list[Partition]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise DataError(
            f"no text column {column!r}; columns found: {parquet.schema_arrow.names}", file=path, column=column
        )
    for row, value in enumerate(parquet.read(columns=[column]).column(0).to_pylist(), start=1):
        _check_text(value, path, row, column)
    digest, total = file_hash(path), parquet.metadata.num_rows
    return [
        Partition(
            id=f"{digest}-{start}-{stop}", file=str(path), format="parquet", text_column=column, start=start, stop=stop
        )
        for start, stop in _ranges([0] * total, rows)
    ]


def plan_partitions(source: Path, text_column: str = "text", rows: int = 10_000) -> list[Partition]:
    """Every input file under ``source`` checked and cut into partitions of at most ``rows`` records, in order."""
    parts: list[Partition] = []
    for path in input_files(source):
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            planned = _plan_parquet(path, text_column, rows)
        else:
            plan = _plan_csv if suffix == ".csv" else _plan_jsonl
            planned = plan(path, path.read_bytes(), text_column, rows)
        if not planned:
            raise DataError("no records", file=path, hint="Remove the empty file or add rows")
        parts += planned
    return parts


def read_partition(part: Partition) -> pd.DataFrame:
    """The partition's records with all of the file's columns (CSV columns as text)."""
    path = Path(part.file)
    if part.format == "parquet":
        return _read_parquet_rows(path, part.start, part.stop)
    with path.open("rb") as fh:
        head = fh.read(part.header_bytes)
        fh.seek(part.byte_start)
        body = fh.read(part.byte_stop - part.byte_start)
    if part.format == "csv":
        text = (head + body).decode("utf-8").removeprefix("\ufeff")
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    else:
        frame = pd.DataFrame([json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()])
    if len(frame) != part.rows:
        raise DataError(
            f"partition {part.id} holds {len(frame)} records, planned {part.rows}", file=path, row=part.start + 1,
            hint="The file changed after it was planned; run again",
        )  # fmt: skip
    return frame


def _read_parquet_rows(path: Path, start: int, stop: int) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    groups: list[int] = []
    offset = first = 0
    for i in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(i).num_rows
        if offset < stop and offset + size > start:
            if not groups:
                first = offset
            groups.append(i)
        offset += size
    table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
    return pa.Table.slice(table, start - first, stop - start).to_pandas()
