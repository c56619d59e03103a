"""Reading multi-label examples: NLU++ fold files and folders, and tables with a ``labels`` column.

Every reader returns a frame of ``text``, ``labels`` (a list of label names), ``file``, ``row``
(counted from 1) and ``column`` (the label column), and every problem is a ``DataError`` naming
file, row, column and value.

- NLU++ (Casanueva et al. 2022): a fold file is a JSON list of ``{"text", "intents": [...],
  "slots": {...}}`` (no ``intents``: no label); a domain folder holds ``fold0.json`` ...
  ``fold19.json``; a folder of domain folders (NLU++'s ``data/``) joins the domains fold by fold.
  The intents of a domain are the ontology's (``ontology.json`` in the folder or its parent) whose
  ``domain`` lists it or ``general``.
- Tables (CSV, TSV, JSONL, Parquet; .gz too): a text column and a label column of ``;``-separated
  names (an empty cell: no label); columns as ``data.text_column``/``data.label_column`` say, else
  the first of the scenario's layouts that fits (``text,labels`` or ``text,intents``).

A label name must be a valid MLflow metric-key part (letters, digits, ``_ - . /`` and spaces).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_flows.plugins import DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.plugins.specs import Scenario
from finetune_flows.tasks.core.data_checks import CONTROL_CHARACTERS, ColumnChoice, resolve_columns
from finetune_flows.tasks.core.tables import DEFAULT_MAX_FILE_MB, MB, read_table

LABEL_SEPARATOR = ";"
LABEL_NAME = re.compile(r"^[\w.\- /]+$")
FOLD_FILE = re.compile(r"^fold(\d+)\.json$")
ONTOLOGY = "ontology.json"
GENERAL = "general"
COLUMNS = ["text", "labels", "file", "row", "column"]
"""What every reader returns; ``column`` names the label column the row was read from."""


@dataclass(frozen=True)
class Limits:
    """The size caps of ``data`` (``max_file_mb``, ``max_rows``, ``max_text_bytes``)."""

    max_file_mb: float = DEFAULT_MAX_FILE_MB
    max_rows: int | None = None
    max_text_bytes: int | None = None


NO_LIMITS = Limits()
"""Only the default file-size cap."""


def check_text(text: Any, path: Path, row: int, column: str, limits: Limits) -> str:
    """``text`` if it is a non-empty string without control characters and within ``max_text_bytes``."""
    if not isinstance(text, str) or not text.strip():
        raise DataError("empty or missing text", file=path, row=row, column=column, value=text)
    found = CONTROL_CHARACTERS.search(text)
    if found:
        raise DataError(
            f"control character {found.group()!r} at position {found.start()}",
            file=path, row=row, column=column, value=text,
        )  # fmt: skip
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if limits.max_text_bytes is not None and size > limits.max_text_bytes:
        raise DataError(
            f"text of {size:,} UTF-8 bytes, more than data.max_text_bytes ({limits.max_text_bytes:,})",
            file=path, row=row, column=column, value=text[:40], hint="Shorten or drop the row",
        )  # fmt: skip
    return text


def check_names(names: list[Any], path: Path, row: int, column: str) -> list[str]:
    """The label names of one row, each once, in first-seen order; a malformed name is a ``DataError``."""
    kept: list[str] = []
    for name in names:
        if not isinstance(name, str) or not LABEL_NAME.match(name.strip()):
            raise DataError(
                "invalid label name: use letters, digits, '_', '-', '.', '/' and spaces",
                file=path, row=row, column=column, value=name,
            )  # fmt: skip
        if name.strip() not in kept:
            kept.append(name.strip())
    return kept


def check_size(path: Path, limits: Limits) -> None:
    """The file exists and is within ``max_file_mb``."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size > limits.max_file_mb * MB:
        raise DataError(f"file larger than data.max_file_mb ({limits.max_file_mb:g} MB)", file=path)


def is_nlupp_json(path: Path) -> bool:
    """A ``.json`` file whose content starts with ``[``: an NLU++ fold (JSONL starts with ``{``)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4096).lstrip().startswith(b"[")


def read_nlupp_json(path: Path, limits: Limits = NO_LIMITS) -> pd.DataFrame:
    """One NLU++ fold file: its texts and intents."""
    check_size(path, limits)
    try:
        examples = json.loads(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
    if not isinstance(examples, list):
        raise DataError("not an NLU++ fold: expected a JSON list of examples", file=path, value=type(examples).__name__)
    if limits.max_rows is not None and len(examples) > limits.max_rows:
        raise DataError(f"{len(examples):,} examples, more than data.max_rows ({limits.max_rows:,})", file=path)
    rows = []
    for row, example in enumerate(examples, start=1):
        if not isinstance(example, dict):
            raise DataError("not a JSON object", file=path, row=row, value=example)
        text = check_text(example.get("text"), path, row, "text", limits)
        intents = example.get("intents", [])
        if not isinstance(intents, list):
            raise DataError("intents must be a list of names", file=path, row=row, column="intents", value=intents)
        rows.append((text, check_names(intents, path, row, "intents"), str(path), row, "intents"))
    return pd.DataFrame(rows, columns=COLUMNS)


def read_labels_table(
    path: Path, scenario: Scenario, columns: ColumnChoice, limits: Limits = NO_LIMITS
) -> pd.DataFrame:
    """A table with a text column and a column of ``;``-separated label names."""
    frame = read_table(path, scenario, max_file_mb=limits.max_file_mb, max_rows=limits.max_rows)
    text_column, label_column = resolve_columns(frame, path, scenario, columns)
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    rows = []
    for row, (text, cell) in enumerate(zip(frame[text_column], frame[label_column], strict=True), start=1):
        names = [name for name in str(cell).split(LABEL_SEPARATOR) if name.strip()]
        checked = check_names(names, path, row, label_column)
        rows.append((check_text(text, path, row, text_column, limits), checked, str(path), row, label_column))
    return pd.DataFrame(rows, columns=COLUMNS)


def fold_files(folder: Path) -> dict[int, Path]:
    """The ``fold<N>.json`` files of a folder by fold number."""
    found = (FOLD_FILE.match(p.name) for p in folder.iterdir() if p.is_file())
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


@dataclass(frozen=True)
class FoldFolder:
    """An NLU++ folder: its domains and, per fold number, the fold files (one per domain)."""

    root: Path
    domains: tuple[str, ...]
    folds: dict[int, tuple[Path, ...]]


def find_folds(folder: Path) -> FoldFolder | None:
    """``folder`` as an NLU++ domain folder (fold files) or a folder of domain folders; None if it is neither."""
    own = fold_files(folder)
    if own:
        return FoldFolder(folder, (folder.name,), {n: (p,) for n, p in sorted(own.items())})
    domains = {sub.name: fold_files(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()}
    domains = {name: files for name, files in domains.items() if files}
    if not domains:
        return None
    numbers = sorted({n for files in domains.values() for n in files})
    joined = {n: tuple(files[n] for files in domains.values() if n in files) for n in numbers}
    return FoldFolder(folder, tuple(domains), joined)


def read_folds(source: FoldFolder, numbers: list[int], limits: Limits = NO_LIMITS) -> pd.DataFrame:
    """The examples of the given folds (every domain), in fold order."""
    frames = [read_nlupp_json(path, limits) for n in numbers for path in source.folds[n]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def ontology_intents(folder: Path, domains: tuple[str, ...]) -> tuple[list[str], Path] | None:
    """The sorted intents NLU++'s ontology gives ``domains`` (theirs and the general ones) and the ontology's path;
    None when there is no ``ontology.json`` in ``folder`` or its parent, or it does not know a domain."""
    path = next((p / ONTOLOGY for p in (folder, folder.parent) if (p / ONTOLOGY).is_file()), None)
    if path is None:
        return None
    try:
        intents = json.loads(decode_utf8(path, path.read_bytes()))["intents"]
        scopes = {name: set(spec["domain"]) for name, spec in intents.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"not an NLU++ ontology ({type(exc).__name__}: {exc})", file=path) from exc
    known = set().union(*scopes.values()) if scopes else set()
    if not set(domains) <= known:
        return None
    return sorted(name for name, scope in scopes.items() if scope & {*domains, GENERAL}), path


def read_examples(path: Path, scenario: Scenario, columns: ColumnChoice, limits: Limits = NO_LIMITS) -> pd.DataFrame:
    """Any supported input as examples: an NLU++ folder (all folds), fold file, or a table."""
    if path.is_dir():
        source = find_folds(path)
        if source is None:
            raise DataError("a folder without NLU++ fold files (fold0.json ...)", file=path)
        return read_folds(source, list(source.folds), limits)
    if is_nlupp_json(path):
        return read_nlupp_json(path, limits)
    return read_labels_table(path, scenario, columns, limits)
