"""Monitor, stages 3-6: store scored records, count them per topic and window, find spikes, report.

The store and its windows are ``tasks/record_store.py``.

Spike rule, for a window w of topic t that gained new records in this run:
- w holds at least ``min_volume`` records, at least ``min_negatives`` of them negative (so one
  negative text in a small window of a quiet topic, share 1/6 over a zero baseline, is no spike);
- among the N = ``baseline_windows`` windows just before w, at least ``min_baseline_windows``
  hold records of t; their shares are the baseline (empty windows are left out);
- share(w) > mean + max(k_sigma * std, min_margin), with the population std of the baseline.
  The margin (default 0.1) rules out alerts on a flat or near-flat baseline, where the std is 0
  and one more negative text would otherwise be a spike: on a baseline of all zeros, a window of
  ten texts with one negative (share 0.1) does not alert.
Only windows that gained new records in this run are judged, so replaying a batch raises no
alert twice (a later batch adding records to a window judges it again). A late record in an older
window changes the baselines of later windows without re-judging them. The trend (table and
plot) covers the batch's windows and the N before them; the plot rings every spike among the
batch's windows, so a replay draws the same plot.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.monitoring.record_store import (
    StoreResult,
    TopicWindow,
    negative_examples,
    store_frame,
    window_counts,
    window_start,
)
from finetune_flows.tasks.monitoring.scoring import MonitorConfig, ScoredBatch, db_path

logger = logging.getLogger(__name__)


class TrendResult(BaseModel):
    """The per-topic trend of the batch's windows and the N windows before them (a Parquet file)."""

    model_config = ConfigDict(frozen=True)

    trend_path: str
    batch_id: str
    rows: int
    first_window: int
    last_window: int


class Alert(BaseModel):
    """A negative-share spike of one topic in one window."""

    model_config = ConfigDict(frozen=True)

    topic: str
    window_start: datetime
    window_end: datetime
    volume: int
    negatives: int
    share: float
    baseline_mean: float
    baseline_std: float
    baseline_windows: int
    threshold: float
    examples: list[str] = []


class ReportResult(BaseModel):
    """Where the plot is and which events were sent."""

    model_config = ConfigDict(frozen=True)

    trend_png: str
    events: list[str]


def batch_trend(stored: StoreResult, config: MonitorConfig) -> pd.DataFrame:
    """The trend of the batch's windows and the ``baseline_windows`` before them (every baseline it needs)."""
    first = stored.first_window - config.baseline_windows
    return window_counts(Path(stored.db_path), first, stored.last_window, config.window_minutes)


def find_spikes(trend: pd.DataFrame, touched: list[TopicWindow], config: MonitorConfig) -> list[Alert]:
    """Apply the spike rule (module docstring) to the touched windows of ``trend``."""
    alerts: list[Alert] = []
    counts = {(r["topic"], r["window_index"]): r for r in trend.to_dict("records")}
    for key in sorted(set(touched), key=lambda k: (k.topic, k.window)):
        current = counts.get((key.topic, key.window))
        if current is None or current["volume"] < config.min_volume or current["negatives"] < config.min_negatives:
            continue
        prior = (counts.get((key.topic, w)) for w in range(key.window - config.baseline_windows, key.window))
        base = np.array([row["share"] for row in prior if row is not None])  # only non-empty windows are rows
        if len(base) < config.min_baseline_windows:
            continue
        mean, std = float(base.mean()), float(base.std())  # numpy's std is the population std (ddof=0)
        threshold = mean + max(config.k_sigma * std, config.min_margin)
        if current["share"] > threshold:
            alerts.append(
                Alert(
                    topic=key.topic,
                    window_start=window_start(key.window, config.window_minutes),
                    window_end=window_start(key.window + 1, config.window_minutes),
                    volume=int(current["volume"]),
                    negatives=int(current["negatives"]),
                    share=float(current["share"]),
                    baseline_mean=mean,
                    baseline_std=std,
                    baseline_windows=len(base),
                    threshold=threshold,
                )
            )
    return alerts


def plot_trend(
    trend: pd.DataFrame,
    spikes: list[Alert],
    path: Path,
    min_volume: int = 1,
    drifted: list[tuple[datetime, datetime]] | None = None,
) -> Path:
    """Negative share per topic and window, spikes ringed in red, drifted windows shaded (matplotlib, Agg).

    Lines join only windows that hold ``min_volume`` texts (the volume an alert needs) and break
    at the others; those show as faint dots, since a topic with one or two texts in a window
    swings between 0 and 1 and would hide the trends that can alert.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import date2num

    fig, ax = plt.subplots(figsize=(9, 4))
    if not trend.empty:
        width = trend["window_end"].iloc[0] - trend["window_start"].iloc[0]
        first, last = int(trend["window_index"].min()), int(trend["window_index"].max())
        grid = pd.Index(range(first, last + 1), name="window_index")
        starts = [trend["window_start"].min() + (w - first) * width for w in grid]
        for topic, group in trend.groupby("topic"):
            full = group.set_index("window_index").reindex(grid)
            enough = full["volume"] >= min_volume
            (line,) = ax.plot(starts, full["share"].where(enough), marker="o", markersize=3, label=str(topic))
            few = full["share"].where(~enough & full["volume"].notna())
            ax.scatter(starts, few, s=6, color=line.get_color(), alpha=0.3)
    for number, (start, end) in enumerate(drifted or []):
        span = date2num(start), date2num(end)
        ax.axvspan(*span, color="orange", alpha=0.15, label="text drift" if number == 0 else None)
    if spikes:
        ring = pd.DataFrame([a.model_dump() for a in spikes])
        ax.scatter(ring["window_start"], ring["share"], s=160, facecolors="none", edgecolors="red", label="spike")
    ax.set(ylabel="negative share", xlabel="window start (UTC)", ylim=(-0.02, 1.02))
    ax.set_title(f"Negative share per topic (lines: windows with >= {min_volume} texts; dots: fewer)")
    ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def alerts_markdown(alerts: list[Alert], png: Path, config: MonitorConfig) -> str:
    """The alert artifact: each spike with its numbers and example texts."""
    rule = (
        f"share > baseline mean + max({config.k_sigma:g} x std, {config.min_margin:g}); volume >= {config.min_volume}; "
        f"negatives >= {config.min_negatives}; "
        f">= {config.min_baseline_windows} non-empty of the last {config.baseline_windows} windows"
    )
    lines = [f"### Negative-share spikes: {len(alerts)}", "", f"Rule: {rule}. Trend plot: `{png}`", ""]
    for a in alerts:
        lines += [
            f"**{a.topic}**, window {a.window_start:%Y-%m-%d %H:%M} to {a.window_end:%H:%M} UTC: "
            f"share **{a.share:.2f}** ({a.negatives}/{a.volume}), "
            f"baseline {a.baseline_mean:.2f} +- {a.baseline_std:.2f} over "
            f"{a.baseline_windows} windows (threshold {a.threshold:.2f})",
            "",
            *[f"> {text.replace(chr(10), ' ')}" + "\n" for text in a.examples],
        ]
    return "\n".join(lines)


@task(name="store-records")
def store_records(scored: ScoredBatch, config: MonitorConfig) -> StoreResult:
    """Append the scored records to the store; records already stored are skipped."""
    path = db_path(config)
    stored = store_frame(
        path,
        pd.read_parquet(scored.scored_path),
        scored.model_version,
        scored.batch_id,
        config.window_minutes,
        span_us=(scored.first_ts_us, scored.last_ts_us),
        skipped=scored.already_stored,
    )
    logger.info("store: %d new, %d already stored, in %s", stored.new, stored.duplicates, path)
    return stored


@task(name="compute-trends")
def compute_trends(stored: StoreResult, config: MonitorConfig) -> TrendResult:
    """Volume and negative share per topic for the batch's windows and the N before them."""
    trend = batch_trend(stored, config)
    path = config.store_path() / "work" / stored.batch_id / "trend.parquet"
    trend.to_parquet(path, index=False)
    create_table_artifact(
        key="finance-trend",
        description=f"Negative share per topic and {config.window_minutes}-minute window",
        table=[
            {
                "topic": r["topic"],
                "window_start": f"{r['window_start']:%Y-%m-%d %H:%M}",
                "volume": r["volume"],
                "negatives": r["negatives"],
                "share": round(r["share"], 4),
            }
            for r in trend.to_dict("records")
        ],
    )
    return TrendResult(
        trend_path=str(path),
        batch_id=stored.batch_id,
        rows=len(trend),
        first_window=stored.first_window - config.baseline_windows,
        last_window=stored.last_window,
    )


@task(name="detect-spikes")
def detect_spikes(trend: TrendResult, stored: StoreResult, config: MonitorConfig) -> list[Alert]:
    """The spikes among the windows that gained records, each with example negative texts."""
    alerts = find_spikes(pd.read_parquet(trend.trend_path), stored.touched, config)
    store, limit = Path(stored.db_path), config.examples_per_alert
    return [
        a.model_copy(update={"examples": negative_examples(store, a.topic, a.window_start, a.window_end, limit)})
        for a in alerts
    ]


@task(name="report")
def report(
    trend: TrendResult, alerts: list[Alert], drifted: list[tuple[datetime, datetime]], config: MonitorConfig
) -> ReportResult:
    """Trend plot (drifted windows shaded), alert artifact, one ``finance.negative_spike`` Prefect event per alert."""
    frame = pd.read_parquet(trend.trend_path)
    # The plot rings every spike of the batch's windows (not only this run's alerts), so a replay draws the same plot.
    first = trend.first_window + config.baseline_windows
    every = [
        TopicWindow(topic=r["topic"], window=r["window_index"])
        for r in frame.to_dict("records")
        if r["window_index"] >= first
    ]
    png_path = config.store_path() / "reports" / f"trend-{trend.batch_id}.png"
    png = plot_trend(frame, find_spikes(frame, every, config), png_path, config.min_volume, drifted)
    create_markdown_artifact(
        key="finance-alerts", description="Negative-share spikes", markdown=alerts_markdown(alerts, png, config)
    )
    events: list[str] = []
    for a in alerts:
        event = emit_event(
            event="finance.negative_spike",
            resource={"prefect.resource.id": f"finance.topic.{a.topic}", "prefect.resource.name": a.topic},
            payload={
                "topic": a.topic,
                "window_start": a.window_start.isoformat(),
                "window_end": a.window_end.isoformat(),
                "share": a.share,
                "baseline_mean": a.baseline_mean,
                "baseline_std": a.baseline_std,
                "volume": a.volume,
                "model": f"models:/{config.model_name}@{config.alias}",
            },
        )
        if event is not None:
            events.append(str(event.id))
        logger.warning(
            "alert: %s negative share %.2f in window %s (baseline %.2f)",
            a.topic,
            a.share,
            a.window_start,
            a.baseline_mean,
        )
    return ReportResult(trend_png=str(png), events=events)
