"""How labelled rows are split: stratified, seeded hold-outs; the content hash of a split; the one-line account
of which rows train, select the checkpoint, evaluate and test."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def stratified_split(labels: pd.Series, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of (kept, held out): each class gives ``fraction`` of its rows (at least one), seeded."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    held: list[int] = []
    for label in sorted(labels.unique()):
        positions = np.flatnonzero(labels.to_numpy() == label)
        rng.shuffle(positions)
        n_held = max(round(len(positions) * fraction), 1) if len(positions) > 1 else 0
        held.extend(positions[:n_held])
        keep.extend(positions[n_held:])
    return np.sort(np.array(keep, dtype=int)), np.sort(np.array(held, dtype=int))


def frame_hash(frame: pd.DataFrame) -> str:
    """sha256 over the (text, label) rows of ``frame`` in order: the identity of a split."""
    digest = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        digest.update(text.encode("utf-8") + b"\x1f" + label.encode("utf-8") + b"\x1e")
    return digest.hexdigest()


def describe_splits(rows: dict[str, int], sources: dict[str, str]) -> str:
    """One line: which rows train, select (checkpoint choice), evaluate and test, and where each came from."""
    parts = [f"train {rows['train']} rows from {sources['train']}"]
    if rows.get("select"):
        parts.append(f"select {rows['select']} rows ({sources['select']}) choose the checkpoint")
    parts.append(f"eval {rows['eval']} rows from {sources['eval']}")
    parts.append(f"test {rows['test']} rows from {sources['test']}" if rows.get("test") else "no test split")
    return "; ".join(parts)
