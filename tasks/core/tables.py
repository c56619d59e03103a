"""Reading labelled tables: CSV, TSV, JSONL and Parquet (each optionally gzipped) as strict UTF-8.

Every problem is a ``DataError`` naming file, row (or line), column and value. A scenario may
read its own formats (``Scenario.read_file``); everything else goes through ``read_table``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from finetune_flows.plugins import DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.plugins.specs import Scenario


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


def read_table(path: Path, scenario: Scenario | None = None) -> pd.DataFrame:
    """Read one file into a DataFrame of strings; the scenario may read its own formats."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", file=path, hint="Give a file with a header and data rows")
    if scenario is not None:
        custom = scenario.read_file(path)
        if custom is not None:
            return custom
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) > 1 else suffixes[-1] if suffixes else ""
    raw = path.read_bytes()
    if compressed:
        raw = gzip.decompress(raw)
    if not raw.strip():
        raise DataError("file is empty", file=path, hint="Give a file with a header and data rows")
    if kind == ".parquet":
        frame = pd.read_parquet(io.BytesIO(raw))
        return frame.astype({c: "string" for c in frame.columns}).fillna("")
    text = decode_utf8(path, raw)
    try:
        if kind == ".tsv":  # GLUE-style TSV: quotes are ordinary characters
            return pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
        if kind in {".csv", ".txt"}:
            return pd.read_csv(io.StringIO(text), sep=",", dtype=str, keep_default_na=False)
        if kind in {".jsonl", ".ndjson", ".json"}:
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"invalid JSON: {exc.msg}", file=path, line=number, value=line) from exc
                    if not isinstance(record, dict):
                        raise DataError("not a JSON object", file=path, line=number, value=line)
                    rows.append(record)
            # object dtype keeps 1 as "1" (not "1.0") when a key is missing; null/missing -> "".
            return pd.DataFrame(rows, dtype=object).fillna("").astype(str)
    except pd.errors.ParserError as exc:
        raise DataError(f"cannot parse: {exc}", file=path) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty", file=path) from exc
    raise DataError(
        f"unsupported file type {kind!r}",
        file=path,
        hint="Use .csv, .tsv, .jsonl or .parquet (optionally .gz)",
    )


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
) -> pd.DataFrame:
    """Validate every row; return columns ``text`` and ``label`` (the label's name).

    ``label_map`` (raw value -> label name) is applied first; a raw value it does not list must be
    a label the scenario knows."""
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    label_map = label_map or {}
    texts = frame[text_col].astype(str)
    labels = frame[label_col].astype(str).str.strip()
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
