"""Out-of-scope rows: messages no label fits, kept apart from training for a hand-off to measure itself on.

A classifier that hands unsure messages to a person (the ``customer-service`` scenario's ``fit-handoff``)
needs messages it should not answer to measure how many of them it hands off. Two sources, both set
aside at ingest so they never train and never enter the label set:

- rows whose raw label is ``data.out_of_scope_label`` (e.g. ``oos`` in CLINC150-style data);
- with ``data.held_out_labels = k``, ``k`` labels chosen with the run's seed: their training rows are
  dropped and their eval and test rows become out-of-scope (data without out-of-scope examples still gets
  the figures; the model then does not know those ``k`` labels, so use it for measuring, or keep ``k`` 0).

``set_aside`` returns the rows that stay and the out-of-scope ones; ingest writes the latter to
``out_of_scope.parquet`` (columns ``text``, ``label`` as written, ``split``: eval or test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

OUT_OF_SCOPE = "__out_of_scope__"
"""The label name rows marked out of scope get while they are read (never a class of the model)."""
OUT_OF_SCOPE_FILE = "out_of_scope.parquet"
REPORTED_SPLITS = ("eval", "test")
"""The splits whose out-of-scope rows are kept (select and train only lose theirs)."""


def held_out_labels(labels: pd.Series, count: int, seed: int) -> list[str]:
    """``count`` of the distinct ``labels`` chosen with ``seed`` (sorted); fewer than 2 left is a ``ValueError``."""
    classes = sorted(set(labels) - {OUT_OF_SCOPE})
    if count and len(classes) - count < 2:
        raise ValueError(f"data.held_out_labels={count} leaves {len(classes) - count} of {len(classes)} labels")
    return sorted(np.random.default_rng(seed).choice(classes, size=count, replace=False).tolist()) if count else []


def set_aside(
    train: pd.DataFrame, held: dict[str, pd.DataFrame], held_out: list[str]
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame]:
    """(training rows, held-out splits, out-of-scope rows) with the rows marked ``OUT_OF_SCOPE`` and those of the
    ``held_out`` labels taken out of every split; the eval and test ones become the out-of-scope rows."""
    outside = {OUT_OF_SCOPE, *held_out}
    kept = {split: part[~part["label"].isin(outside)] for split, part in held.items()}
    out = [
        part.loc[part["label"].isin(outside), ["text", "label"]].assign(split=split)
        for split, part in held.items()
        if split in REPORTED_SPLITS
    ]
    frame = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["text", "label", "split"])
    return train[~train["label"].isin(outside)], kept, frame


def describe(rows: pd.DataFrame, held_out: list[str]) -> str:
    """``"out of scope: 120 eval / 310 test rows (held-out labels a, b)"``; empty when there are none."""
    if rows.empty:
        return ""
    counts = rows["split"].value_counts()
    parts = " / ".join(f"{int(counts.get(s, 0))} {s}" for s in REPORTED_SPLITS if s in counts)
    labels = f" (held-out labels {', '.join(held_out)})" if held_out else ""
    return f"out of scope: {parts} rows{labels}"
