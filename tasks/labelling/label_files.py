"""Where people's labels go: CSV files in the scenario's data folder, one per ``label`` run.

``<data_folder>/labels-<run>.csv`` has the columns ``text,label`` that every scenario reads
(generic layout) plus who labelled it, when, with which model version it was picked and how
unsure that model was. The file is rewritten whole after every answered batch, through a
temporary file and an atomic rename, so a crash mid-batch loses at most the batch on screen and
never leaves a half-written file that a retrain would read. Texts a person skipped go to
``<data_folder>/.label-skips.csv`` (hidden: retraining reads only visible files), so they are not
asked again. ``.label-state.json`` remembers how many labels there were when retraining was last
requested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

LABEL_COLUMNS = ["text", "label", "labelled_by", "labelled_at", "model_version", "uncertainty"]
SKIPS_FILE, STATE_FILE = ".label-skips.csv", ".label-state.json"
PREFIX = "labels-"


def replace_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    frame.to_csv(partial, index=False)
    with partial.open("rb") as fh:
        os.fsync(fh.fileno())
    partial.replace(path)
    return path


def append_rows(path: Path, rows: list[dict[str, object]], columns: list[str]) -> int:
    """``rows`` appended to the CSV at ``path`` (created if missing), atomically; the rows it holds now."""
    old = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame(columns=columns)
    frame = pd.concat([old, pd.DataFrame(rows, columns=columns)], ignore_index=True)
    replace_csv(frame, path)
    return len(frame)


def label_files(folder: Path) -> list[Path]:
    """The label files the ``label`` flow wrote in ``folder``."""
    return sorted(folder.glob(f"{PREFIX}*.csv")) if folder.is_dir() else []


def labelled_texts(folder: Path) -> set[str]:
    """Texts that have a label in any label file of ``folder``, or were skipped."""
    seen: set[str] = set()
    for path in [*label_files(folder), folder / SKIPS_FILE]:
        if path.is_file():
            seen.update(pd.read_csv(path, dtype=str, keep_default_na=False)["text"].tolist())
    return seen


def label_count(folder: Path) -> int:
    """Labels in all label files of ``folder``."""
    return sum(len(pd.read_csv(p, dtype=str, keep_default_na=False)) for p in label_files(folder))


def labels_at_last_request(folder: Path) -> int:
    """How many labels there were when retraining was last requested (0 if never)."""
    path = folder / STATE_FILE
    return int(json.loads(path.read_text(encoding="utf-8"))["labels_at_request"]) if path.is_file() else 0


def record_request(folder: Path, labels: int) -> None:
    """Remember that retraining was requested with ``labels`` labels in the folder."""
    partial = folder / f".{STATE_FILE}.partial"
    partial.write_text(json.dumps({"labels_at_request": labels}), encoding="utf-8")
    partial.replace(folder / STATE_FILE)
