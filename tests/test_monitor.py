"""The ``monitor`` flow: reading with an error report, the store's deduplication, trends and the
spike rule as plain functions; one flow run under Prefect's harness with a registered keyword
pyfunc as the champion; and the whole monitor path in a process where torch cannot be imported.

The keyword model stands in for the ONNX classifier (whose pyfunc is tested elsewhere): it
tests the monitor, not the model.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.pyfunc import PythonModel
from pydantic import ValidationError

from finetune_flows.plugins import DataError
from finetune_flows.tasks.monitoring.batch_records import BadRecordPolicy, check_batch, read_source
from finetune_flows.tasks.monitoring.record_store import StoreResult, store_frame, stored_mask
from finetune_flows.tasks.monitoring.scoring import MonitorConfig, attach_predictions
from finetune_flows.tasks.monitoring.trends import Alert, batch_trend, find_spikes

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2024, 3, 4, tzinfo=UTC)
TEMPLATES = {  # topic: (positive text, negative text)
    "banks": ("Bank {i} raised its dividend in hour {h}", "Bank {i} reported a loss in hour {h}"),
    "energy": ("Oil major {i} grew output in hour {h}", "Oil major {i} cut output in hour {h}"),
}
BASELINE = (1, 2, 1, 2, 1, 2, 1)  # negatives of 10 texts in hours 0..6: shares 0.1/0.2, mean 0.14, std 0.05


def classify(text: str) -> tuple[str, str]:
    """(label, topic) by keywords: 'loss', 'cut', 'fell' are negative; 'bank' and 'oil' name topics."""
    words = text.lower().split()
    label = "negative" if {"loss", "cut", "fell"} & set(words) else "positive"
    topic = "banks" if "bank" in words else "energy" if "oil" in words else "markets"
    return label, topic


class KeywordModel(PythonModel):
    """A deterministic stand-in for the champion with the production output columns, topic included."""

    def predict(self, context: object, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = []
        for text in model_input["text"]:
            label, topic = classify(text)
            probs = {"negative": 0.05, "neutral": 0.05, "positive": 0.05, label: 0.9}
            rows.append({"label": label, "score": 0.9, **{f"prob_{k}": v for k, v in probs.items()}, "topic": topic})
        return pd.DataFrame(rows)


def window_rows(topic: str, hour: int, volume: int, negatives: int) -> list[dict[str, str]]:
    positive, negative = TEMPLATES[topic]
    return [
        {
            "timestamp": (START + timedelta(hours=hour, minutes=5 * i)).isoformat().replace("+00:00", "Z"),
            "source": "wire",
            "text": (negative if i < negatives else positive).format(i=i, h=hour),
        }
        for i in range(volume)
    ]


def stream(last: dict[str, tuple[int, int]], baseline: tuple[int, ...] = BASELINE) -> list[dict[str, str]]:
    """Hours 0..6 with 10 texts per topic and ``baseline`` negatives; hour 7 with (volume, negatives) per topic."""
    rows = []
    for topic in TEMPLATES:
        for hour, negatives in enumerate(baseline):
            rows += window_rows(topic, hour, 10, negatives)
        rows += window_rows(topic, len(baseline), *last[topic])
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], extra: str = "") -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(extra)
    return path


def monitor_logic(source: Path, store: Path, config: MonitorConfig) -> tuple[list[Alert], pd.DataFrame, StoreResult]:
    """The flow's steps as plain functions: read, score, store, trend, spikes."""
    good, _, batch_id = read_source(source)
    scored = attach_predictions(good, KeywordModel().predict(None, good[["text"]]))
    stored = store_frame(store / "records.sqlite", scored, "1", batch_id, config.window_minutes)
    trend = batch_trend(stored, config)
    return find_spikes(trend, stored.touched, config), trend, stored


@pytest.fixture
def config(tmp_path: Path) -> MonitorConfig:
    return MonitorConfig(source=str(tmp_path / "batch.csv"), store_dir=str(tmp_path / "store"))


def test_injected_spike_raises_one_alert_for_its_topic_and_window(tmp_path: Path, config: MonitorConfig) -> None:
    write_csv(tmp_path / "batch.csv", stream({"banks": (10, 6), "energy": (10, 2)}))
    alerts, trend, stored = monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)

    assert stored.new == 160 and len(trend) == 16
    assert [(a.topic, a.window_start, a.volume, a.negatives) for a in alerts] == [
        ("banks", START + timedelta(hours=7), 10, 6)
    ]
    spike = alerts[0]
    assert spike.window_end - spike.window_start == timedelta(minutes=60)
    # Baseline: hours 1..6 (the last N=6), shares .2 .1 .2 .1 .2 .1; population std 0.05.
    assert spike.baseline_windows == 6
    assert spike.baseline_mean == pytest.approx(0.15) and spike.baseline_std == pytest.approx(0.05)
    assert spike.threshold == pytest.approx(0.25) and spike.share == pytest.approx(0.6)


def test_flat_streams_raise_no_alert(tmp_path: Path, config: MonitorConfig) -> None:
    write_csv(tmp_path / "batch.csv", stream({"banks": (10, 1), "energy": (10, 2)}))
    assert monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)[0] == []
    # A flat zero baseline (std 0): one negative in ten (share 0.1) is not above 0 + min_margin 0.1.
    write_csv(tmp_path / "zero.csv", stream({"banks": (10, 1), "energy": (10, 0)}, baseline=(0,) * 7))
    assert monitor_logic(tmp_path / "zero.csv", tmp_path / "zero-store", config)[0] == []


def test_one_negative_over_a_zero_baseline_is_no_spike(tmp_path: Path, config: MonitorConfig) -> None:
    # 1 of 6 (share 0.17) clears 0 + min_margin 0.1 and the volume rule; min_negatives (3) stops it.
    write_csv(tmp_path / "batch.csv", stream({"banks": (6, 1), "energy": (10, 0)}, baseline=(0,) * 7))
    assert monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)[0] == []
    one = config.model_copy(update={"min_negatives": 1})
    alerts = monitor_logic(tmp_path / "batch.csv", tmp_path / "one", one)[0]
    assert [(a.topic, a.volume, a.negatives) for a in alerts] == [("banks", 6, 1)]


def test_minimum_volume_suppresses_an_alert_on_a_window_of_two_texts(tmp_path: Path, config: MonitorConfig) -> None:
    write_csv(tmp_path / "batch.csv", stream({"banks": (2, 2), "energy": (10, 2)}))
    assert monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)[0] == []
    # The same window judged with min_volume=2 is a spike: the volume rule alone suppressed it.
    low = config.model_copy(update={"min_volume": 2, "min_negatives": 2})
    alerts = monitor_logic(tmp_path / "batch.csv", tmp_path / "low", low)[0]
    assert [(a.topic, a.volume, a.share) for a in alerts] == [("banks", 2, 1.0)]


def test_too_few_baseline_windows_raise_no_alert(tmp_path: Path, config: MonitorConfig) -> None:
    rows = window_rows("banks", 5, 10, 1) + window_rows("banks", 6, 10, 2) + window_rows("banks", 7, 10, 8)
    write_csv(tmp_path / "batch.csv", rows)  # two baseline windows < min_baseline_windows 3
    assert monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)[0] == []
    two = config.model_copy(update={"min_baseline_windows": 2})
    assert len(monitor_logic(tmp_path / "batch.csv", tmp_path / "two", two)[0]) == 1


def test_rerunning_a_batch_leaves_store_and_trend_unchanged(tmp_path: Path, config: MonitorConfig) -> None:
    rows = stream({"banks": (10, 6), "energy": (10, 2)})
    write_csv(tmp_path / "batch.csv", rows + rows[:3])  # three records twice in the same batch
    first, trend, stored = monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)
    assert (stored.new, stored.duplicates, len(first)) == (160, 3, 1)
    with sqlite3.connect(tmp_path / "store" / "records.sqlite") as con:
        before = con.execute("SELECT * FROM records ORDER BY text_sha256, ts_us").fetchall()

    again, trend_again, replay = monitor_logic(tmp_path / "batch.csv", tmp_path / "store", config)
    assert (replay.new, replay.duplicates, replay.touched, again) == (0, 163, [], [])
    pd.testing.assert_frame_equal(trend, trend_again)
    with sqlite3.connect(tmp_path / "store" / "records.sqlite") as con:
        assert con.execute("SELECT * FROM records ORDER BY text_sha256, ts_us").fetchall() == before


def bad_batch(folder: Path) -> Path:
    """A folder with good and bad records in a CSV and a JSONL file, a file with wrong columns, a non-UTF-8 file."""
    folder.mkdir()
    (folder / "a.csv").write_text(
        "timestamp,source,text\n"
        "2024-03-04T01:05:00+01:00,wire,Bank A reported a loss\n"  # row 1, line 2: good, 00:05 UTC
        ",wire,Bank B raised its dividend\n"  # row 2, line 3: missing timestamp
        "yesterday,wire,Bank C cut jobs\n"  # row 3, line 4: unparsable timestamp
        "2024-03-04T00:10:00Z,wire,   \n"  # row 4, line 5: empty text
        '2024-03-04T00:20:00,wire,"Oil major D grew\noutput"\n'  # row 5, lines 6-7: good, naive = UTC
        '2024-03-04T00:30:00Z,wire,"Bank E, said ""fine"""\n'  # row 6, line 8: good
        "2024-03-04T00:40:00Z,wire\n",  # row 7, line 9: too few fields
        encoding="utf-8",
    )
    (folder / "b.jsonl").write_text(
        json.dumps({"timestamp": "2024-03-04T01:00:00Z", "source": "feed", "text": "Oil major F cut output"})
        + "\n\n"
        + json.dumps({"timestamp": "not a time", "source": "feed", "text": "Bank G"})  # row 2, line 3
        + "\n"
        + json.dumps({"source": "feed", "text": "Bank H"})  # row 3, line 4: no timestamp
        + "\n{not json\n",  # row 4, line 5
        encoding="utf-8",
    )
    (folder / "c.csv").write_text("time,source,body\n2024-03-04T00:00:00Z,wire,Bank I\n", encoding="utf-8")
    (folder / "d.csv").write_bytes(b"timestamp,source,text\n2024-03-04T00:00:00Z,wire,caf\xe9 bank\n")
    return folder


def test_records_stored_before_are_found_before_scoring(tmp_path: Path, config: MonitorConfig) -> None:
    source = write_csv(tmp_path / "batch.csv", stream({"banks": (10, 6), "energy": (10, 2)}))
    good, _, batch_id = read_source(source)
    db = tmp_path / "store" / "records.sqlite"
    assert not stored_mask(db, good).any()  # no store yet
    first_half = good.iloc[: len(good) // 2]
    store_frame(db, attach_predictions(first_half, KeywordModel().predict(None, first_half[["text"]])), "1", "a", 60)

    known = stored_mask(db, good)
    assert known.tolist() == [True] * len(first_half) + [False] * (len(good) - len(first_half))
    fresh = good.loc[~known]
    span = (int(good["ts_us"].min()), int(good["ts_us"].max()))
    scored = attach_predictions(fresh, KeywordModel().predict(None, fresh[["text"]]))
    stored = store_frame(db, scored, "1", batch_id, 60, span_us=span, skipped=int(known.sum()))
    assert (stored.new, stored.duplicates) == (len(fresh), len(first_half))
    assert (stored.first_window, stored.last_window) == (span[0] // 3_600_000_000, span[1] // 3_600_000_000)
    # the whole batch in one go gives the same trend
    _, whole, _ = monitor_logic(source, tmp_path / "whole", config)
    pd.testing.assert_frame_equal(batch_trend(stored, config), whole)


def test_bad_records_are_reported_with_row_line_and_value(tmp_path: Path) -> None:
    good, bad, _ = read_source(bad_batch(tmp_path / "batch"))

    assert good["text"].tolist() == [
        "Bank A reported a loss",
        "Oil major D grew\noutput",
        'Bank E, said "fine"',
        "Oil major F cut output",
    ]
    assert [t.isoformat() for t in good["timestamp"]] == [
        "2024-03-04T00:05:00+00:00",
        "2024-03-04T00:20:00+00:00",
        "2024-03-04T00:30:00+00:00",
        "2024-03-04T01:00:00+00:00",
    ]
    assert good[["row", "line"]].values.tolist() == [[1, 2], [5, 6], [6, 8], [1, 1]]
    report = [(Path(b.file).name, b.row, b.line, b.column, b.value, b.problem) for b in bad]
    assert [entry[:5] for entry in report] == [
        ("a.csv", 2, 3, "timestamp", ""),
        ("a.csv", 3, 4, "timestamp", "yesterday"),
        ("a.csv", 4, 5, "text", "   "),
        ("a.csv", 7, 9, None, "2024-03-04T00:40:00Z,wire"),
        ("b.jsonl", 2, 3, "timestamp", "not a time"),
        ("b.jsonl", 3, 4, "timestamp", None),
        ("b.jsonl", 4, 5, None, "{not json"),
        ("c.csv", None, 1, "timestamp,text", "time,source,body"),
        ("d.csv", None, 2, None, "2024-03-04T00:00:00Z,wire,caf\ufffd"),
    ]
    problems = [entry[5] for entry in report]
    assert problems[0] == problems[5] == "missing timestamp" and problems[2] == "empty text"
    assert problems[1].startswith("unparsable timestamp") and problems[4].startswith("unparsable timestamp")
    assert problems[3] == "expected 3 fields, got 2" and problems[6].startswith("invalid JSON")
    assert problems[7] == "missing required column(s) ['timestamp', 'text']; whole file skipped"
    assert problems[8].startswith("not valid UTF-8")


def test_a_batch_without_good_records_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("timestamp,source,text\n,wire,Bank A\nnope,wire,Bank B\n", encoding="utf-8")
    good, bad, _ = read_source(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"no good record in the batch \(2 bad; first: missing timestamp .* line 2"):
        check_batch(str(tmp_path / "bad.csv"), len(good), bad, BadRecordPolicy.REPORT, tmp_path / "errors.csv")
    with pytest.raises(DataError, match=r"1 bad record\(s\) and on_bad_records=fail"):
        check_batch("batch", 3, bad[:1], BadRecordPolicy.FAIL, tmp_path / "errors.csv")
    with pytest.raises(DataError, match="batch file or folder not found"):
        read_source(tmp_path / "missing.csv")


def test_config_is_bounded_and_closed() -> None:
    with pytest.raises(ValidationError, match="min_baseline_windows"):
        MonitorConfig(source="x.csv", baseline_windows=2, min_baseline_windows=3)
    with pytest.raises(ValidationError, match="window_minutes"):
        MonitorConfig(source="x.csv", window_minutes=0)
    with pytest.raises(ValidationError, match="extra"):
        MonitorConfig(source="x.csv", threshold=0.5)  # type: ignore[call-arg]


def test_predictions_without_topic_go_to_topic_all(tmp_path: Path) -> None:
    records = pd.DataFrame({"text": ["a", "b"]})
    scored = attach_predictions(records, pd.DataFrame({"label": ["negative", "positive"], "score": [0.9, 0.8]}))
    assert scored["topic"].tolist() == ["all", "all"]
    with pytest.raises(DataError, match="model output has 1 rows"):
        attach_predictions(records, pd.DataFrame({"label": ["negative"], "score": [0.9]}))


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
sys.modules["transformers"] = None
from pathlib import Path
import pandas as pd
import finetune_flows.flows.monitor
from finetune_flows.tasks.monitoring.batch_records import read_source
from finetune_flows.tasks.monitoring.scoring import MonitorConfig, attach_predictions
from finetune_flows.tasks.monitoring.record_store import store_frame
from finetune_flows.tasks.monitoring.trends import batch_trend, find_spikes

folder = Path(sys.argv[1])
rows = [("2024-03-04T%02d:%02d:00Z" % (h, m), "wire", "Bank %d news %d" % (h, m)) for h in range(8) for m in range(10)]
pd.DataFrame(rows, columns=["timestamp", "source", "text"]).to_csv(folder / "batch.csv", index=False)
config = MonitorConfig(source=str(folder / "batch.csv"), store_dir=str(folder / "store"))
good, bad, batch_id = read_source(folder / "batch.csv")
labels = ["negative" if (h == 7 and m < 6) or m == 0 else "positive" for h in range(8) for m in range(10)]
scored = attach_predictions(good, pd.DataFrame({"label": labels, "score": 0.9, "topic": "banks"}))
stored = store_frame(folder / "store" / "records.sqlite", scored, "1", batch_id, 60)
alerts = find_spikes(batch_trend(stored, config), stored.touched, config)
assert [(a.topic, a.window_start.hour) for a in alerts] == [("banks", 7)], alerts
loaded = [m for m in ("torch", "transformers") if sys.modules.get(m) is not None]
assert not loaded, loaded
print("monitor path ok without torch")
"""


def test_monitor_path_runs_without_torch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_TORCH), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "monitor path ok without torch" in done.stdout


def register_keyword_model(name: str = "finance-monitoring") -> None:
    """Log ``KeywordModel`` as a pyfunc, register it as ``name`` and give it alias ``champion``."""
    from finetune_flows.tasks.core.settings import get_settings

    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.create_experiment("monitor-test", artifact_location=f"{settings.artifact_root}/monitor-test")
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=KeywordModel(), pip_requirements=["mlflow"], registered_model_name=name
        )
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", str(info.registered_model_version))


def read_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return str(latest[0].data)


@pytest.mark.usefixtures("prefect_harness")
def test_monitor_flow_scores_stores_alerts_and_replays(state_dir: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.monitor import monitor

    register_keyword_model()
    folder = bad_batch(tmp_path / "batch")
    (folder / "a.csv").unlink()  # the good records come from the stream, the bad ones from the other files
    write_csv(folder / "stream.csv", stream({"banks": (10, 6), "energy": (10, 2)}), extra=",wire,no time\n")
    config = MonitorConfig(source=str(folder))

    first = monitor(config)
    assert (first.records_read, first.bad_records, first.new_records, first.duplicates_skipped) == (161, 6, 161, 0)
    assert [(a.topic, a.window_start) for a in first.alerts] == [("banks", START + timedelta(hours=7))]
    assert first.alerts[0].examples == [f"Bank {i} reported a loss in hour 7" for i in range(3)]
    assert len(first.events) == 1 and first.model_version == "1"
    assert Path(first.store) == state_dir.resolve() / "monitor" / "finance-monitoring" / "records.sqlite"
    errors = pd.read_csv(first.error_report)
    assert len(errors) == 6 and ("stream.csv", 161, 162, "timestamp") in {
        (Path(f).name, r, ln, c) for f, r, ln, c in errors[["file", "row", "line", "column"]].itertuples(index=False)
    }
    assert Path(first.trend_png).is_file() and Path(first.trend_png).stat().st_size > 1000
    alerts_md = read_artifact("finance-alerts")
    assert "**banks**" in alerts_md and "2024-03-04 07:00" in alerts_md and first.trend_png in alerts_md
    assert "Bank 0 reported a loss in hour 7" in alerts_md
    trend_table = json.loads(read_artifact("finance-trend"))
    assert (
        len(trend_table) == 16
        and {"topic": "banks", "window_start": "2024-03-04 07:00"}.items() <= trend_table[7].items()
    )
    assert len(json.loads(read_artifact("finance-errors"))) == 6
    trend = pd.read_parquet(first.trend_path)

    again = monitor(config)
    assert (again.new_records, again.duplicates_skipped, again.alerts, again.events) == (0, 161, [], [])
    rescored = Path(again.store).parent / "work" / again.batch_id / "scored.parquet"
    assert pd.read_parquet(rescored).empty  # stored records are not scored again
    pd.testing.assert_frame_equal(pd.read_parquet(again.trend_path), trend)
    with sqlite3.connect(again.store) as con:
        assert con.execute("SELECT COUNT(*) FROM records").fetchone() == (161,)


@pytest.mark.usefixtures("prefect_harness")
def test_monitor_flow_fails_on_a_batch_without_good_records(state_dir: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.monitor import monitor

    (tmp_path / "bad.jsonl").write_text('{"timestamp": "soon", "source": "x", "text": "Bank A"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no good record in the batch \(1 bad; first: unparsable timestamp"):
        monitor(MonitorConfig(source=str(tmp_path / "bad.jsonl")))
    report = state_dir.resolve() / "monitor" / "finance-monitoring" / "errors"
    assert [len(pd.read_csv(p)) for p in report.glob("errors-*.csv")] == [1]
