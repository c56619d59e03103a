"""Reading a monitor batch: one CSV or JSONL file (strict UTF-8) or a folder of them, checked record by record.

A batch has columns ``timestamp``, ``source`` and ``text`` (more columns are ignored).
Timestamps are ISO 8601; one with an offset is converted to UTC, a naive one is taken to be UTC
already. Each bad record (missing or unparsable timestamp, empty text, a malformed line) is
listed in an error report with its file, row, line, column and value; a file that lacks a
required column or cannot be decoded is reported as a whole. The good records of the same batch
go on all the same; a batch without a single good record fails with a ``DataError``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins.errors import DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.tasks.core.reports import safe_record

REQUIRED = ("timestamp", "source", "text")
SUFFIXES = (".csv", ".jsonl")


class BadRecordPolicy(StrEnum):
    """What a bad record does to the batch."""

    REPORT = "report"
    FAIL = "fail"


class BadRecord(BaseModel):
    """One entry of the error report; ``row`` counts data rows from 1, ``line`` is the physical line."""

    model_config = ConfigDict(frozen=True)

    file: str
    row: int | None = None
    line: int | None = None
    column: str | None = None
    value: str | None = None
    problem: str


def batch_files(source: Path) -> list[Path]:
    """``source`` itself, or the CSV and JSONL files anywhere below the folder ``source`` (sorted)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError("no CSV or JSONL files in folder", file=source, hint="Name batch files *.csv or *.jsonl")
        return files
    if not source.is_file():
        raise DataError("batch file or folder not found", file=source)
    if source.suffix.lower() not in SUFFIXES:
        raise DataError("unsupported batch file type", file=source, value=source.suffix, hint="Use .csv or .jsonl")
    return [source]


def _short(value: object, limit: int = 200) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entry(error: DataError) -> BadRecord:
    """An error-report entry from the facts of a ``DataError``."""
    value = _short(error.value)
    return BadRecord(
        file=error.file or "", row=error.row, line=error.line, column=error.column, value=value, problem=error.problem
    )


def _require(path: Path, columns: list[str], line: int | None) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(
            f"missing required column(s) {missing}; whole file skipped",
            file=path,
            line=line,
            column=",".join(missing),
            value=",".join(columns),
        )


def _csv_rows(path: Path, text: str) -> list[dict[str, Any] | DataError]:
    """Records of a CSV file (``row``, ``line`` where each starts), or what is wrong with one."""
    reader = csv.reader(io.StringIO(text, newline=""))
    out: list[dict[str, Any] | DataError] = []
    try:
        header = [h.strip() for h in next(reader, [])]
        _require(path, header, line=1)
        row, last_line = 0, reader.line_num
        for fields in reader:
            line, last_line = last_line + 1, reader.line_num
            if not fields:
                continue  # a blank line is not a row
            row += 1
            if len(fields) != len(header):
                problem = f"expected {len(header)} fields, got {len(fields)}"
                out.append(DataError(problem, file=path, row=row, line=line, value=",".join(fields)))
            else:
                out.append({**dict(zip(header, fields, strict=True)), "file": str(path), "row": row, "line": line})
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc}); whole file skipped", file=path, line=reader.line_num) from exc
    return out


def _jsonl_rows(path: Path, text: str) -> list[dict[str, Any] | DataError]:
    """Records of a JSONL file (one object per line), or what is wrong with one."""
    out: list[dict[str, Any] | DataError] = []
    keys: set[str] = set()
    lines = [(number, raw) for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    for row, (line, raw) in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.append(DataError(f"invalid JSON ({exc.msg})", file=path, row=row, line=line, value=raw))
            continue
        if not isinstance(record, dict):
            out.append(DataError("not a JSON object", file=path, row=row, line=line, value=raw))
            continue
        keys.update(record)
        out.append({**record, "file": str(path), "row": row, "line": line})
    if keys:
        _require(path, sorted(keys), line=None)
    return out


def _check(raw: dict[str, Any]) -> dict[str, Any] | DataError:
    """The record with a non-empty text and a timestamp string (parsed later), or what is wrong."""
    where = {"file": raw["file"], "row": raw["row"], "line": raw["line"]}
    text, stamp, source = raw.get("text"), raw.get("timestamp"), raw.get("source")
    if not isinstance(text, str) or not text.strip():
        problem = "empty text" if text is None or isinstance(text, str) else "text is not a string"
        return DataError(problem, **where, column="text", value=text)
    if stamp is None or (isinstance(stamp, str) and not stamp.strip()):
        return DataError("missing timestamp", **where, column="timestamp", value=stamp)
    if not isinstance(stamp, str):
        return DataError("timestamp is not a string", **where, column="timestamp", value=stamp)
    source = "" if source is None else str(source).strip()
    return {**where, "timestamp": stamp.strip(), "source": source, "text": text.strip()}


def read_source(source: Path) -> tuple[pd.DataFrame, list[BadRecord], str]:
    """(good records, bad records, batch id) of a batch file or folder.

    Good records have columns file, row, line, timestamp (UTC), ts_us (microseconds since the
    epoch), source, text and text_sha256. The batch id hashes the files' names and bytes.
    """
    digest = hashlib.sha256()
    raw_rows: list[dict[str, Any]] = []
    bad: list[BadRecord] = []
    for path in batch_files(source):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\x1f" + hashlib.sha256(data).digest())
        try:
            text = decode_utf8(path, data).removeprefix("\ufeff")
            rows = (_jsonl_rows if path.suffix.lower() == ".jsonl" else _csv_rows)(path, text)
        except DataError as exc:
            bad.append(_entry(exc))
            continue
        for item in rows:
            checked = _check(item) if isinstance(item, dict) else item
            if isinstance(checked, DataError):
                bad.append(_entry(checked))
            else:
                raw_rows.append(checked)

    frame = pd.DataFrame(raw_rows, columns=["file", "row", "line", "timestamp", "source", "text"])
    parsed = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601", errors="coerce")
    for r in frame.loc[parsed.isna()].to_dict("records"):
        problem = "unparsable timestamp (expected ISO 8601, e.g. 2024-03-01T09:30:00Z)"
        where = {"file": r["file"], "row": r["row"], "line": r["line"]}
        bad.append(BadRecord(**where, column="timestamp", value=_short(r["timestamp"]), problem=problem))
    good = frame.loc[parsed.notna()].assign(timestamp=parsed[parsed.notna()].astype("datetime64[us, UTC]"))
    good = good.assign(
        ts_us=good["timestamp"].astype("int64"),
        text_sha256=[hashlib.sha256(t.encode("utf-8")).hexdigest() for t in good["text"]],
    ).reset_index(drop=True)
    bad.sort(key=lambda b: (b.file, b.line or 0))
    return good, bad, digest.hexdigest()[:16]


def write_error_report(bad: list[BadRecord], path: Path) -> Path:
    """The full error report as a formula-safe CSV (a header only when there is nothing to report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(BadRecord.model_fields))
        writer.writeheader()
        writer.writerows(safe_record(b.model_dump()) for b in bad)
    return path


def check_batch(source: str, good: int, bad: list[BadRecord], policy: BadRecordPolicy, report: Path) -> None:
    """Fail when no record is good, or when any is bad and the policy says fail."""
    first = f"; first: {bad[0].problem} in {bad[0].file} line {bad[0].line}, value {bad[0].value!r}" if bad else ""
    if good == 0:
        raise DataError(
            f"no good record in the batch ({len(bad)} bad{first})", file=source, hint=f"See the error report {report}"
        )
    if bad and policy is BadRecordPolicy.FAIL:
        raise DataError(
            f"{len(bad)} bad record(s) and on_bad_records=fail{first}",
            file=source,
            hint=f"See the error report {report}",
        )
