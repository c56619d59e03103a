"""Monitor, stages 1-2: read a batch of new finance texts and score it with the registered champion.

Reading and checking the batch is ``tasks/batch_records.py``. Scoring loads
``models:/<model_name>@<alias>`` with ``mlflow.pyfunc`` (onnxruntime inside, no torch) and scores
only the records the store does not hold yet, so a deployment that rereads a growing folder
every few minutes scores each record once. A model without a ``topic`` output puts every record
in topic ``all``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune_flows.plugins.errors import DataError
from finetune_flows.tasks.batch.engine import Engine, EngineConfig
from finetune_flows.tasks.batch.runner import predict_frame, resolve_version
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.monitoring.batch_records import (
    BadRecord,
    BadRecordPolicy,
    check_batch,
    read_source,
    write_error_report,
)
from finetune_flows.tasks.monitoring.drift import DriftRule, DriftSignal
from finetune_flows.tasks.monitoring.record_store import stored_mask

logger = logging.getLogger(__name__)

ALL_TOPICS = "all"
MAX_LISTED = 500  # bad records carried in the task result and the artifact; the CSV lists all


class MonitorConfig(EngineConfig):
    """Score new finance texts with the champion, store them, and alert on negative-share spikes per topic.

    The engine fields (``engine``, ``workers``, ...) choose where the new records are scored: in this
    process (the default) or in partitions on a Dask cluster, with the same results."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(min_length=1, max_length=1000, description="A CSV or JSONL batch file, or a folder of them.")
    model_name: str = Field(
        default="finance-monitoring", min_length=1, max_length=200, description="Registered MLflow model."
    )
    alias: str = Field(
        default="champion", pattern=r"^[\w-]{1,100}$", description="Alias of the model version that scores."
    )
    store_dir: str | None = Field(
        default=None, max_length=1000, description="Store folder. Empty: <state>/monitor/<model_name>."
    )
    window_minutes: int = Field(default=60, ge=1, le=10080, description="Trend window length (aligned to epoch).")
    baseline_windows: int = Field(
        default=6, ge=1, le=1000, description="N: windows before a window that form its baseline."
    )
    min_baseline_windows: int = Field(
        default=3, ge=1, le=1000, description="Fewest non-empty windows among the last N needed to judge a window."
    )
    k_sigma: float = Field(default=2.0, ge=0.0, le=10.0, description="Spike: share > baseline mean + k * std.")
    min_margin: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Spike: share must also exceed the baseline mean by more than this."
    )
    min_volume: int = Field(default=5, ge=1, le=1_000_000, description="Fewest texts in a window for an alert.")
    min_negatives: int = Field(
        default=3, ge=1, le=1_000_000, description="Fewest negative texts in a window for an alert."
    )
    examples_per_alert: int = Field(default=3, ge=0, le=20, description="Negative example texts shown per alert.")
    on_bad_records: BadRecordPolicy = Field(
        default=BadRecordPolicy.REPORT, description="report: list bad records and go on; fail: stop the run."
    )
    drift_signals: list[DriftSignal] = Field(
        default=[DriftSignal.EMBEDDING, DriftSignal.PREDICTION],
        description="Drift signals that raise model.drift when they fire (all are measured; empty: never raised).",
    )
    drift_window_minutes: int = Field(
        default=1440, ge=1, le=43200, description="Drift window length: a multiple of window_minutes."
    )
    drift_min_volume: int = Field(default=50, ge=10, le=1_000_000, description="Fewest texts in a judged drift window.")
    drift_sample: int = Field(default=300, ge=10, le=5000, description="Texts per drift window embedded for the test.")
    drift_alpha: float = Field(
        default=0.002, gt=0.0, le=0.5, description="embedding: fires when the MMD test's p-value is below this."
    )
    drift_max_prediction_shift: float = Field(
        default=0.25, ge=0.0, le=1.0, description="prediction: fires above this total-variation distance."
    )
    drift_max_confidence_drop: float = Field(
        default=0.1, ge=0.0, le=1.0, description="confidence: fires when the mean confidence falls by more."
    )
    drift_max_oov_increase: float = Field(
        default=0.1, ge=0.0, le=1.0, description="vocabulary: fires when the out-of-vocabulary share rises by more."
    )
    drift_max_length_ks: float = Field(
        default=0.3, ge=0.0, le=1.0, description="length: fires above this Kolmogorov-Smirnov statistic."
    )

    @model_validator(mode="after")
    def _baseline_fits(self) -> MonitorConfig:
        if self.min_baseline_windows > self.baseline_windows:
            raise ValueError(
                f"min_baseline_windows ({self.min_baseline_windows}) exceeds baseline_windows ({self.baseline_windows})"
            )
        if self.drift_window_minutes % self.window_minutes:
            raise ValueError(
                f"drift_window_minutes ({self.drift_window_minutes}) is not a multiple of "
                f"window_minutes ({self.window_minutes})"
            )
        return self

    def drift_rule(self) -> DriftRule:
        """The drift rule of these settings."""
        return DriftRule(
            signals=self.drift_signals,
            alpha=self.drift_alpha,
            max_prediction_shift=self.drift_max_prediction_shift,
            max_confidence_drop=self.drift_max_confidence_drop,
            max_oov_increase=self.drift_max_oov_increase,
            max_length_ks=self.drift_max_length_ks,
        )

    def store_path(self) -> Path:
        """The store folder (created on first use)."""
        path = Path(self.store_dir) if self.store_dir else get_settings().state / "monitor" / self.model_name
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()


class BatchRead(BaseModel):
    """The good records of a batch (a Parquet file) and its error report."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    records_path: str
    records: int
    bad: int
    errors_path: str
    errors: list[BadRecord] = Field(description=f"The first {MAX_LISTED} bad records; the CSV lists all.")


class ScoredBatch(BaseModel):
    """The newly scored records (a Parquet file), the model version that scored them, the batch's span."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    scored_path: str
    records: int
    already_stored: int = Field(description="Records of the batch the store held already: not scored again.")
    first_ts_us: int
    last_ts_us: int
    model_uri: str
    model_version: str


def attach_predictions(records: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """``records`` plus label, score and topic from the model's output (topic ``all`` when it has none)."""
    if len(predicted) != len(records) or not {"label", "score"} <= set(predicted.columns):
        raise DataError(
            f"model output has {len(predicted)} rows and columns {list(predicted.columns)}",
            hint=f"Expected {len(records)} rows with columns label, score (and prob_<label>..., optional topic)",
        )
    raw = predicted["topic"].tolist() if "topic" in predicted.columns else [None] * len(predicted)
    topics = [str(t).strip() if isinstance(t, str) and t.strip() else ALL_TOPICS for t in raw]
    return records.reset_index(drop=True).assign(
        label=predicted["label"].astype(str).to_numpy(),
        score=predicted["score"].astype(float).to_numpy(),
        topic=topics,
    )


@task(name="read-batch")
def read_batch(config: MonitorConfig) -> BatchRead:
    """Read the batch, write its good records as Parquet and its error report as CSV and a table artifact."""
    good, bad, batch_id = read_source(Path(config.source).expanduser())
    work = config.store_path() / "work" / batch_id
    report = write_error_report(bad, config.store_path() / "errors" / f"errors-{batch_id}.csv")
    create_table_artifact(
        key="finance-errors",
        description=f"Bad records of batch {batch_id} ({len(bad)}; the full list is {report})",
        table=[b.model_dump() for b in bad[:MAX_LISTED]],
    )
    if bad:
        logger.warning("read: %d bad record(s) in %s; report %s", len(bad), config.source, report)
    check_batch(config.source, len(good), bad, config.on_bad_records, report)
    work.mkdir(parents=True, exist_ok=True)
    good.to_parquet(work / "records.parquet", index=False)
    logger.info("read: %d good record(s) from %s (batch %s)", len(good), config.source, batch_id)
    return BatchRead(
        batch_id=batch_id,
        records_path=str(work / "records.parquet"),
        records=len(good),
        bad=len(bad),
        errors_path=str(report),
        errors=bad[:MAX_LISTED],
    )


def db_path(config: MonitorConfig) -> Path:
    """The store's SQLite file."""
    return config.store_path() / "records.sqlite"


@task(name="score-records")
def score_records(batch: BatchRead, config: MonitorConfig) -> ScoredBatch:
    """Score the batch's records that are not stored yet with ``models:/<model_name>@<alias>``."""
    import mlflow

    version = resolve_version(config.model_name, config.alias)
    uri = f"models:/{config.model_name}@{config.alias}"
    pinned = f"models:/{config.model_name}/{version}"  # the alias may move
    records = pd.read_parquet(batch.records_path)
    known = stored_mask(db_path(config), records)
    fresh = records.loc[~known].reset_index(drop=True)
    if fresh.empty:
        scored = fresh.assign(label=pd.Series(dtype=str), score=pd.Series(dtype=float), topic=pd.Series(dtype=str))
    elif config.engine is Engine.LOCAL:
        model = mlflow.pyfunc.load_model(pinned)
        scored = attach_predictions(fresh, model.predict(pd.DataFrame({"text": fresh["text"]})))
    else:  # the same predictions, computed in partitions on a Dask cluster
        work = Path(batch.records_path).with_name("partitions")
        scored = attach_predictions(fresh, predict_frame(fresh, pinned, version, work, config.engine_settings()))
    path = Path(batch.records_path).with_name("scored.parquet")
    scored.to_parquet(path, index=False)
    logger.info(
        "score: %d record(s) with %s (version %s); %d already stored",
        len(scored), uri, version, int(known.sum()),
    )  # fmt: skip
    return ScoredBatch(
        batch_id=batch.batch_id,
        scored_path=str(path),
        records=len(scored),
        already_stored=int(known.sum()),
        first_ts_us=int(records["ts_us"].min()),
        last_ts_us=int(records["ts_us"].max()),
        model_uri=uri,
        model_version=str(version),
    )
