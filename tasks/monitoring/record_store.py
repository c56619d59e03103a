"""The monitor's record store: one SQLite file of scored records, keyed by content hash, time and source.

``<store_dir>/records.sqlite``, table ``records`` keyed by (sha256(text), timestamp in UTC
microseconds, source). SQLite rather than date-partitioned Parquet because deduplication is then
the database's job: ``INSERT OR IGNORE`` against the primary key inside one transaction, so
re-running a batch never counts a record twice, a crashed run leaves nothing half-written, and
two runs at once queue on the write lock instead of racing between "read the stored keys" and
"write a new part file". Windows are a ``GROUP BY`` over an index on the timestamp. A record
keeps the label, score, topic and model version of its first scoring.

Windows are ``minutes`` long and aligned to the Unix epoch; window ``w`` starts ``w`` window
lengths after it. A window's negative share is the share of its records labelled ``negative``.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict

KEY = ["text_sha256", "ts_us", "source"]
COLUMNS = [*KEY, "timestamp", "text", "topic", "label", "score", "model_version", "batch_id"]
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    text_sha256 TEXT NOT NULL, ts_us INTEGER NOT NULL, source TEXT NOT NULL, timestamp TEXT NOT NULL,
    text TEXT NOT NULL, topic TEXT NOT NULL, label TEXT NOT NULL, score REAL, model_version TEXT NOT NULL,
    batch_id TEXT NOT NULL, PRIMARY KEY (text_sha256, ts_us, source)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_time ON records (ts_us, topic);
"""
NEGATIVE = "negative"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TopicWindow(BaseModel):
    """A topic and a window index (window start = index * window length since the epoch)."""

    model_config = ConfigDict(frozen=True)

    topic: str
    window: int


class StoreResult(BaseModel):
    """What storing a batch added; the batch's window span; the windows that gained records."""

    model_config = ConfigDict(frozen=True)

    db_path: str
    batch_id: str
    new: int
    duplicates: int
    first_window: int
    last_window: int
    touched: list[TopicWindow]


def window_us(minutes: int) -> int:
    """A window's length in microseconds."""
    return minutes * 60 * 1_000_000


def window_start(window: int, minutes: int) -> datetime:
    """When window ``window`` starts (UTC)."""
    return EPOCH + timedelta(microseconds=window * window_us(minutes))


def connect(db_path: Path) -> sqlite3.Connection:
    """A connection to the store (schema created if missing); waits up to 60 s for another writer."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db_path, timeout=60, isolation_level=None)  # transactions are explicit
    con.executescript(SCHEMA)
    return con


def stored_mask(db_path: Path, records: pd.DataFrame) -> pd.Series:
    """True for each record whose key is in the store already (read before scoring: those need no model)."""
    if not db_path.is_file() or records.empty:
        return pd.Series(False, index=records.index)
    keys = list(zip(*(records[c].tolist() for c in KEY), strict=True))
    with closing(connect(db_path)) as con:
        con.execute("CREATE TEMP TABLE probe (text_sha256 TEXT, ts_us INTEGER, source TEXT)")
        con.executemany("INSERT INTO probe VALUES (?, ?, ?)", keys)
        found = set(
            con.execute(
                "SELECT p.text_sha256, p.ts_us, p.source FROM probe p JOIN records r "
                "ON r.text_sha256 = p.text_sha256 AND r.ts_us = p.ts_us AND r.source = p.source"
            ).fetchall()
        )
    return pd.Series([key in found for key in keys], index=records.index)


def store_frame(
    db_path: Path,
    scored: pd.DataFrame,
    model_version: str,
    batch_id: str,
    minutes: int,
    span_us: tuple[int, int] | None = None,
    skipped: int = 0,
) -> StoreResult:
    """Store the records whose key is not stored yet, in one transaction; the windows that gained records.

    ``span_us`` is the batch's (first, last) timestamp when ``scored`` holds only part of it (the
    records not stored before scoring, ``skipped`` of them left out); by default ``scored``'s own.
    """
    rows = scored.assign(
        timestamp=scored["timestamp"].map(lambda t: t.isoformat()), model_version=model_version, batch_id=batch_id
    )[COLUMNS]
    values = list(zip(*(rows[c].tolist() for c in COLUMNS), strict=True))
    with closing(connect(db_path)) as con:
        con.execute("BEGIN IMMEDIATE")  # the write lock first: no other run stores between our check and insert
        try:
            con.execute("CREATE TEMP TABLE incoming AS SELECT * FROM records WHERE 0")
            con.executemany(f"INSERT INTO incoming VALUES ({', '.join('?' * len(COLUMNS))})", values)
            new = pd.read_sql_query(
                "SELECT DISTINCT i.text_sha256, i.ts_us, i.source, i.topic FROM incoming i WHERE NOT EXISTS (SELECT 1 "
                "FROM records r WHERE r.text_sha256 = i.text_sha256 AND r.ts_us = i.ts_us AND r.source = i.source)",
                con,
            )
            con.execute("INSERT OR IGNORE INTO records SELECT * FROM incoming")
            con.execute("DROP TABLE incoming")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    new = new.drop_duplicates(KEY)
    width = window_us(minutes)
    touched = {
        TopicWindow(topic=t, window=w // width) for t, w in zip(new["topic"], new["ts_us"].tolist(), strict=True)
    }
    first_us, last_us = span_us or (int(scored["ts_us"].min()), int(scored["ts_us"].max()))
    return StoreResult(
        db_path=str(db_path),
        batch_id=batch_id,
        new=len(new),
        duplicates=skipped + len(scored) - len(new),
        first_window=first_us // width,
        last_window=last_us // width,
        touched=sorted(touched, key=lambda k: (k.topic, k.window)),
    )


def window_counts(db_path: Path, first_window: int, last_window: int, minutes: int) -> pd.DataFrame:
    """Per topic and non-empty window in [first_window, last_window]: volume, negatives, share, start, end."""
    width = window_us(minutes)
    with closing(connect(db_path)) as con:
        trend = pd.read_sql_query(
            "SELECT topic, (ts_us - ((ts_us % :w) + :w) % :w) / :w AS window_index, COUNT(*) AS volume, "
            "SUM(label = :neg) AS negatives FROM records WHERE ts_us >= :lo AND ts_us < :hi "
            "GROUP BY topic, window_index ORDER BY topic, window_index",
            con,
            params={"w": width, "neg": NEGATIVE, "lo": first_window * width, "hi": (last_window + 1) * width},
        )
    return trend.assign(
        share=trend["negatives"] / trend["volume"],
        window_start=[window_start(w, minutes) for w in trend["window_index"]],
        window_end=[window_start(w + 1, minutes) for w in trend["window_index"]],
    )


def negative_examples(db_path: Path, topic: str, start: datetime, end: datetime, limit: int) -> list[str]:
    """Up to ``limit`` negative texts of ``topic`` in [start, end), most confident first."""
    lo, hi = (round((t - EPOCH) / timedelta(microseconds=1)) for t in (start, end))
    with closing(connect(db_path)) as con:
        rows = con.execute(
            "SELECT text FROM records WHERE topic = ? AND label = ? AND ts_us >= ? AND ts_us < ? "
            "ORDER BY score DESC, text LIMIT ?",
            (topic, NEGATIVE, lo, hi, limit),
        ).fetchall()
    return [r[0] for r in rows]
