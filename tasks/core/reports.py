"""Report CSVs that are safe to open in a spreadsheet (OWASP's advice against CSV/formula injection).

A string cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a
leading ``'`` so that Excel, LibreOffice and Google Sheets show it as text instead of running it as a
formula. Numbers stay numbers (a float ``-0.5`` is not touched; the string ``"-1+2"`` is). Every report
CSV the project writes goes through ``write_csv`` (frames, CRLF rows) or ``safe_record`` (``csv`` writers, whose
rows end in CRLF by default). Files the pipeline reads back as data are not reports and must not go through here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is a string a spreadsheet would read as a formula; else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One ``csv.DictWriter`` row with every string cell made formula-safe."""
    return {key: safe_cell(value) for key, value in record.items()}


def formula_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose string cells are formula-safe; numeric columns are left as they are."""
    safe = frame.copy()
    for column in safe.columns:
        dtype = safe[column].dtype
        if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
            safe[column] = safe[column].map(safe_cell)
    return safe


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` (without its index) as a formula-safe report CSV at ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # CRLF rows (RFC 4180) also make Python 3.11's csv writer quote a cell holding a lone CR, which it leaves bare
    # with "\n" rows, so that a reader would split the row there.
    formula_safe(frame).to_csv(path, index=False, lineterminator="\r\n")
    return path


def safe_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``records`` made formula-safe, for ``csv.DictWriter.writerows``."""
    return [safe_record(record) for record in records]
