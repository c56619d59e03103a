"""Monitor stage: judge text drift per drift window, remember it in the store, raise ``model.drift``.

The drift windows that gained records in this run are judged against the scoring version's
reference (``drift_reference.py``), over every stored record of the window (up to
``drift_sample`` of them embedded, a seeded sample). Each judgement is kept in the store's table
``drift``; a ``model.drift`` Prefect event goes out the first time a window of a version fires,
so a window judged again by a later batch (it gained more records) does not raise it twice.
A version without a reference is reported as such, and nothing is judged.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.monitoring.drift import WindowDrift, window_drift
from finetune_flows.tasks.monitoring.drift_reference import fetch_reference
from finetune_flows.tasks.monitoring.record_store import StoreResult, connect, window_start, window_us
from finetune_flows.tasks.monitoring.scoring import MonitorConfig, ScoredBatch
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.topics import ENCODER_FILE, TOKENIZER_FILE

logger = logging.getLogger(__name__)

DRIFT_EVENT = "model.drift"
SCHEMA = """
CREATE TABLE IF NOT EXISTS drift (
    model_version TEXT NOT NULL, minutes INTEGER NOT NULL, window INTEGER NOT NULL, judged_at TEXT NOT NULL,
    figures TEXT NOT NULL, fired TEXT NOT NULL, PRIMARY KEY (model_version, minutes, window, judged_at)
);
"""


class DriftResult(BaseModel):
    """The drift windows judged in this run, the ones that raised ``model.drift``, and why none was judged."""

    model_config = ConfigDict(frozen=True)

    windows: list[WindowDrift]
    raised: list[int]
    events: list[str]
    window_minutes: int
    note: str = ""

    def drifted_spans(self) -> list[tuple[datetime, datetime]]:
        """(start, end) of every judged window where a signal fired."""
        minutes = self.window_minutes
        return [(window_start(w.window, minutes), window_start(w.window + 1, minutes)) for w in self.windows if w.fired]


def touched_drift_windows(stored: StoreResult, config: MonitorConfig) -> list[int]:
    """The drift windows that hold a trend window which gained records."""
    ratio = config.drift_window_minutes // config.window_minutes
    return sorted({t.window // ratio for t in stored.touched})


def window_records(store: StoreResult, window: int, minutes: int) -> pd.DataFrame:
    """Text, label and score of every stored record in drift window ``window``."""
    width = window_us(minutes)
    with closing(connect(Path(store.db_path))) as con:
        return pd.read_sql_query(
            "SELECT text, label, score FROM records WHERE ts_us >= ? AND ts_us < ? ORDER BY ts_us, text_sha256",
            con,
            params=(window * width, (window + 1) * width),
        )


def fired_before(con: sqlite3.Connection, version: str, minutes: int, window: int) -> bool:
    """Whether an earlier judgement of this window and version fired."""
    row = con.execute(
        "SELECT 1 FROM drift WHERE model_version = ? AND minutes = ? AND window = ? AND fired != '' LIMIT 1",
        (version, minutes, window),
    ).fetchone()
    return row is not None


@task(name="check-drift")
def check_drift(stored: StoreResult, scored: ScoredBatch, config: MonitorConfig) -> DriftResult:
    """Drift of the touched drift windows against the scoring version's reference; ``model.drift`` on a new firing."""
    minutes, version = config.drift_window_minutes, scored.model_version
    found = fetch_reference(config.model_name, version, config.store_path() / "reference")
    if found is None:
        note = f"models:/{config.model_name}/{version} carries no drift reference: drift is not judged"
        logger.warning("drift: %s", note)
        return DriftResult(windows=[], raised=[], events=[], window_minutes=minutes, note=note)
    reference, reference_embeddings, encoder_dir = found
    encoder: SentenceEncoder | None = None  # opened for the first window that has enough records
    rule = config.drift_rule()
    judged: list[WindowDrift] = []
    for window in touched_drift_windows(stored, config):
        records = window_records(stored, window, minutes)
        if len(records) < config.drift_min_volume:
            continue
        rng = np.random.default_rng(window)
        pick = sorted(rng.choice(len(records), min(config.drift_sample, len(records)), replace=False).tolist())
        texts = records["text"].tolist()
        encoder = encoder or SentenceEncoder(encoder_dir / ENCODER_FILE, encoder_dir / TOKENIZER_FILE)
        embeddings = encoder.encode([texts[i] for i in pick])
        labels, scores = records["label"].astype(str).tolist(), records["score"].astype(float).tolist()
        drift = window_drift(window, texts, labels, scores, embeddings, reference, reference_embeddings, rule)
        judged.append(drift)
    raised, events = [], []
    with closing(connect(Path(stored.db_path))) as con:
        con.executescript(SCHEMA)
        for drift in judged:
            first = bool(drift.fired) and not fired_before(con, version, minutes, drift.window)
            con.execute(
                "INSERT OR REPLACE INTO drift VALUES (?, ?, ?, ?, ?, ?)",
                (version, minutes, drift.window, datetime.now(UTC).isoformat(), drift.model_dump_json(),
                 ",".join(drift.fired)),
            )  # fmt: skip
            if first:
                raised.append(drift.window)
                event = emit_drift_event(drift, config, version)
                if event:
                    events.append(event)
    create_table_artifact(
        key="monitor-drift",
        description=f"Text drift per {minutes}-minute window against the training data of version {version}",
        table=[drift_row(d, minutes) for d in judged],
    )
    return DriftResult(windows=judged, raised=raised, events=events, window_minutes=minutes)


def drift_row(drift: WindowDrift, minutes: int) -> dict[str, object]:
    """One window as a table row."""
    return {
        "window_start": f"{window_start(drift.window, minutes):%Y-%m-%d %H:%M}",
        "volume": drift.volume,
        "embedding_p": round(drift.embedding_p, 4),
        "mmd": round(drift.mmd, 5),
        "prediction_shift": round(drift.prediction_shift, 3),
        "confidence_drop": round(drift.confidence_drop, 3),
        "oov_increase": round(drift.oov_increase, 3),
        "length_ks": round(drift.length_ks, 3),
        "fired": ", ".join(drift.fired) or "-",
    }


def emit_drift_event(drift: WindowDrift, config: MonitorConfig, version: str) -> str | None:
    """One ``model.drift`` event about the model; its id."""
    minutes = config.drift_window_minutes
    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"model.{config.model_name}",
            "prefect.resource.name": config.model_name,
            "finetune-flows.model-version": version,
        },
        payload={
            "window_start": window_start(drift.window, minutes).isoformat(),
            "window_end": window_start(drift.window + 1, minutes).isoformat(),
            "signals": [str(s) for s in drift.fired],
            **drift.model_dump(mode="json", exclude={"fired", "window"}),
            "model": f"models:/{config.model_name}/{version}",
        },
    )
    logger.warning(
        "drift: window %s of models:/%s/%s drifted (%s)",
        window_start(drift.window, minutes), config.model_name, version, ", ".join(drift.fired),
    )  # fmt: skip
    return None if event is None else str(event.id)
