"""The files of a ``route`` run: the customer messages in, the routes out.

``read_messages`` reads one column of a CSV, TSV, JSONL or Parquet file (``read_table``) and names every
problem (missing column, no rows, an empty message, a control character) as a ``DataError`` with file, row,
column and value, before any model is loaded. ``write_routes`` writes Parquet as it is, and CSV
formula-safe (a message starting with ``=`` cannot run in a spreadsheet).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from finetune_flows.plugins.errors import DataError
from finetune_flows.tasks.core.data_checks import CONTROL_CHARACTERS
from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.tables import read_table


def read_messages(path: Path, text_column: str = "text") -> list[str]:
    """The messages in ``path``'s ``text_column``: a missing column, no rows, an empty message or a control
    character is a ``DataError`` naming file, row, column and value."""
    frame = read_table(path)
    if text_column not in frame.columns:
        raise DataError(
            f"missing column {text_column!r}; columns found: {list(frame.columns)}",
            file=path,
            column=text_column,
            hint="Name the messages' column with text_column=<name>",
        )
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    texts = frame[text_column].astype(str).tolist()
    for row, text in enumerate(texts, start=1):
        if not text.strip():
            raise DataError("empty message", file=path, row=row, column=text_column, value=text)
        found = CONTROL_CHARACTERS.search(text)
        if found:
            raise DataError(
                f"control character {found.group()!r} at position {found.start()}",
                file=path, row=row, column=text_column, value=text,
                hint="Remove NUL and other control characters (tab, newline and carriage return are allowed)",
            )  # fmt: skip
    return texts


def write_routes(routes: pd.DataFrame, path: Path) -> Path:
    """Parquet for a .parquet path (the data as it is), a formula-safe report CSV otherwise; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        routes.to_parquet(path, index=False)
        return path
    return write_csv(routes, path)
