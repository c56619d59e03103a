"""Checks on the rows of a labelled table once it is read: columns, every text and label, sizes, class balance.

Every problem is a ``DataError`` naming file, row, column and value: a missing column, an empty text
or label, a control character, a label the scenario does not know (after ``data.label_map``), a text
over ``data.max_text_bytes``. Class imbalance is no error: ``class_imbalance`` names it for a warning
and a run tag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from finetune_flows.plugins import DataError
from finetune_flows.plugins.specs import Scenario

# C0 control characters except tab, newline and carriage return: never part of a real text (NUL often marks a
# binary or UTF-16 file), so an error rather than a silent clean-up.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
VALUE_PREFIX = 40
"""Characters of an oversized text shown in its error."""


class ColumnChoice(Protocol):
    """The part of the ingest options that picks columns."""

    text_column: str | None
    label_column: str | None


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


def class_imbalance(labels: pd.Series, max_ratio: float) -> str | None:
    """``"597:3 (199x) positive/negative"`` (largest:smallest class rows, ratio, their names) when the largest class
    has more than ``max_ratio`` times the rows of the smallest; else None."""
    counts = labels.value_counts()
    largest, smallest = str(counts.index[0]), str(counts.index[-1])
    ratio = counts.iloc[0] / counts.iloc[-1]
    if ratio <= max_ratio:
        return None
    shown = f"{ratio:.1f}".removesuffix(".0")
    return f"{counts.iloc[0]}:{counts.iloc[-1]} ({shown}x) {largest}/{smallest}"
