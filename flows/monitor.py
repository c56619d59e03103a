"""Flow ``monitor``: new finance texts -> scored by the champion -> stored -> trend per topic -> spike alerts,
and text drift against the champion's training data -> ``model.drift`` events.

Deployments reach it by entrypoint ``flows/monitor.py:monitor``. Nothing on this path imports
torch: the registered pyfunc runs the ONNX graph on onnxruntime.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.monitoring.drift import WindowDrift
from finetune_flows.tasks.monitoring.drift_check import check_drift
from finetune_flows.tasks.monitoring.scoring import MonitorConfig, read_batch, score_records
from finetune_flows.tasks.monitoring.trends import Alert, compute_trends, detect_spikes, report, store_records


class MonitorSummary(BaseModel):
    """What one monitoring run read, stored and raised."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    records_read: int
    bad_records: int
    new_records: int
    duplicates_skipped: int
    model_version: str
    alerts: list[Alert]
    drift: list[WindowDrift]
    drift_raised: list[int]
    drift_note: str
    events: list[str]
    error_report: str
    trend_path: str
    trend_png: str
    store: str


@flow(name="monitor", log_prints=False)
def monitor(config: MonitorConfig) -> MonitorSummary:
    """Score a batch of finance texts with the champion model, alert on negative-share spikes per topic and on drift."""
    batch = read_batch(config)
    scored = score_records(batch, config)
    stored = store_records(scored, config)
    trend = compute_trends(stored, config)
    alerts = detect_spikes(trend, stored, config)
    drift = check_drift(stored, scored, config)
    reported = report(trend, alerts, drift.drifted_spans(), config)
    return MonitorSummary(
        batch_id=batch.batch_id,
        records_read=batch.records,
        bad_records=batch.bad,
        new_records=stored.new,
        duplicates_skipped=stored.duplicates,
        model_version=scored.model_version,
        alerts=alerts,
        drift=drift.windows,
        drift_raised=drift.raised,
        drift_note=drift.note,
        events=[*reported.events, *drift.events],
        error_report=batch.errors_path,
        trend_path=trend.trend_path,
        trend_png=reported.trend_png,
        store=stored.db_path,
    )
