"""Scoring partitions into part files, in this process or on Dask workers, resumably.

Each partition becomes ``part-<id>.parquet`` in the output folder: the input columns, the model's
output columns and ``model_version`` (an input column that shares a name with a model output is
kept as ``input_<name>``). A part is written to a temporary name and renamed, so a part file that
exists is whole; a rerun skips every partition whose part file exists with the planned row count,
which makes a killed run resumable. ``manifest.json`` lists the model and the parts in input
order (``read_output`` reads them in that order); a folder scored by another model version is
refused rather than mixed.

A worker process loads the model once (``cached_model``, keyed by model URI and threads) and
never imports torch: the registered pyfunc runs its ONNX graph on onnxruntime, whose sessions
use the worker's thread count (``model_config`` ``onnx_threads``). Other partitioned work (recommend's
user partitions) passes its own ``work`` function to ``run_partitions`` and shares the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins.errors import ConfigError, DataError
from finetune_flows.tasks.batch.engine import Engine, EngineConfig, dask_runner
from finetune_flows.tasks.batch.partitions import Partition
from finetune_flows.tasks.batch.partitions import read_partition as read_input
from finetune_flows.tasks.core.secrets import guard, redact
from finetune_flows.tasks.core.settings import get_settings

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_VERSION_COLUMN = "model_version"
_MODELS: dict[tuple[str, int], Any] = {}
_LOCK = threading.Lock()


class PartResult(BaseModel):
    """What scoring one partition did."""

    model_config = ConfigDict(frozen=True)

    id: str
    rows: int
    skipped: bool
    seconds: float
    pid: int


class ScoreRun(BaseModel):
    """A finished partitioned scoring: the output folder, its manifest, what was scored and what skipped."""

    model_config = ConfigDict(frozen=True)

    output: str
    manifest: str
    model_uri: str
    model_version: str
    parts: int
    scored_parts: int
    skipped_parts: int
    rows: int
    seconds: float
    worker_pids: list[int]


def part_path(output: Path, part: Partition) -> Path:
    """The part file of ``part`` in ``output``."""
    return output / f"part-{part.id}.parquet"


def part_complete(path: Path, rows: int) -> bool:
    """True when ``path`` is a readable Parquet file of ``rows`` rows."""
    if not path.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows) == rows
    except Exception:  # a damaged file is scored again
        return False


def resolve_version(model_name: str, alias: str) -> str:
    """The version of ``model_name`` that ``alias`` points at; a ``ConfigError`` when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        raise ConfigError(
            f"no version of registered model {model_name!r} has alias {alias!r} "
            f"in {redact(get_settings().tracking_uri)}; register one with the finetune flow first"
        ) from exc


def cached_model(model_uri: str, threads: int = 0) -> Any:
    """The pyfunc at ``model_uri``, loaded once per process; ``threads`` > 0 sets its ONNX threads."""
    with _LOCK:
        if (model_uri, threads) not in _MODELS:
            import mlflow

            mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
            # The served pyfuncs read onnx_threads from model_config (tasks.serving.text_inputs.onnx_threads).
            model = mlflow.pyfunc.load_model(model_uri, model_config={"onnx_threads": threads} if threads else None)
            _MODELS[(model_uri, threads)] = model
            logger.info("loaded %s in process %d", model_uri, os.getpid())
        return _MODELS[(model_uri, threads)]


def with_predictions(frame: pd.DataFrame, predicted: Any, model_version: str) -> pd.DataFrame:
    """``frame``'s columns, then the model's outputs, then ``model_version``."""
    if not isinstance(predicted, pd.DataFrame):
        predicted = pd.DataFrame({"prediction": list(predicted)})
    if len(predicted) != len(frame):
        raise DataError(f"model output has {len(predicted)} rows for {len(frame)} texts")
    outputs = [*map(str, predicted.columns), MODEL_VERSION_COLUMN]
    inputs = frame.rename(columns={c: f"input_{c}" for c in frame.columns if c in outputs}).reset_index(drop=True)
    scored = pd.concat([inputs, predicted.reset_index(drop=True).rename(columns=str)], axis=1)
    return scored.assign(**{MODEL_VERSION_COLUMN: model_version})


def write_part(frame: pd.DataFrame, target: Path) -> None:
    """Write ``frame`` to the part file ``target`` whole or not at all (a temporary name, then renamed)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    frame.to_parquet(temporary, index=False)
    os.replace(temporary, target)


def score_partition(part: Partition, model_uri: str, model_version: str, output: str, threads: int = 0) -> PartResult:
    """Score one partition into its part file (written whole or not at all); skip it when that file is complete."""
    started, target = time.perf_counter(), part_path(Path(output), part)
    if part_complete(target, part.rows):
        return PartResult(id=part.id, rows=part.rows, skipped=True, seconds=0.0, pid=os.getpid())
    frame = read_input(part)
    model = cached_model(model_uri, threads)
    scored = with_predictions(frame, model.predict(pd.DataFrame({"text": frame[part.text_column]})), model_version)
    write_part(scored, target)
    return PartResult(id=part.id, rows=part.rows, skipped=False, seconds=time.perf_counter() - started, pid=os.getpid())


score_partition_task = task(name="score-partition", cache_policy=NO_CACHE, task_run_name="score-{part.id}")(
    score_partition
)
PartWork = Callable[..., PartResult]  # work(part, model_uri=, model_version=, output=, threads=, **arguments)


def partition_task(work: PartWork) -> Any:
    """The Prefect task that runs ``work`` on one partition (``score_partition``'s is ``score_partition_task``)."""
    if work is score_partition:
        return score_partition_task
    name = work.__name__.replace("_", "-")
    return task(name=name, cache_policy=NO_CACHE, task_run_name=f"{name.split('-')[0]}-{{part.id}}")(work)


def _write_manifest(output: Path, manifest: dict[str, Any]) -> Path:
    path, temporary = output / MANIFEST, output / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temporary, path)
    return path


def _check_folder(output: Path, model_uri: str, model_version: str, parts: list[Partition]) -> None:
    """Refuse a folder scored by another model version; drop part files the current plan does not hold."""
    path = output / MANIFEST
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if (before.get("model_uri"), before.get("model_version")) != (model_uri, model_version):
            raise ConfigError(
                f"output folder {output} holds parts scored by {before.get('model_uri')} version "
                f"{before.get('model_version')}, not {model_uri} version {model_version}; use another folder"
            )
    planned = {part_path(output, p).name for p in parts}
    for stale in output.glob("part-*.parquet"):
        if stale.name not in planned:
            logger.info("score: %s is not in the current plan (the input changed); removed", stale.name)
            stale.unlink()


def run_partitions(
    parts: list[Partition],
    model_uri: str,
    model_version: str,
    output: Path,
    engine: EngineConfig,
    work: PartWork = score_partition,
    arguments: Mapping[str, Any] | None = None,
    part_rows: Mapping[str, int] | None = None,
) -> ScoreRun:
    """Score ``parts`` with ``model_uri`` into ``output`` on ``engine``; completed parts are skipped.

    ``work`` writes one partition's part file (default ``score_partition``), called with the partition,
    ``model_uri``, ``model_version``, ``output``, ``threads`` and ``arguments``; ``part_rows``: the rows of
    each part file (by partition id) when it is complete, if not one per input record."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    _check_folder(output, model_uri, model_version, parts)
    manifest: dict[str, Any] = {
        "model_uri": model_uri,
        "model_version": model_version,
        "complete": False,
        "parts": [
            {"id": p.id, "file": p.file, "start": p.start, "stop": p.stop, "path": part_path(output, p).name}
            for p in parts
        ],
    }
    _write_manifest(output, manifest)
    args = {"model_uri": model_uri, "model_version": model_version, "output": str(output), **(arguments or {})}
    rows = {p.id: p.rows for p in parts} | dict(part_rows or {})
    done = [p for p in parts if part_complete(part_path(output, p), rows[p.id])]  # no cluster for a finished run
    results = [PartResult(id=p.id, rows=rows[p.id], skipped=True, seconds=0.0, pid=os.getpid()) for p in done]
    todo = [p for p in parts if p not in done]
    if engine.engine is Engine.LOCAL or not todo:
        results += [work(p, **args) for p in todo]
    else:
        remote = partition_task(work)
        with dask_runner(engine) as runner:
            futures = [
                runner.submit(remote, parameters={"part": p, **args, "threads": engine.threads_per_worker})
                for p in todo
            ]
            for future in futures:
                future.wait()  # every partition gets its chance before the first failure is raised
            results += [future.result() for future in futures]
    scored = [r for r in results if not r.skipped]
    manifest.update(complete=True, scored_parts=len(scored), skipped_parts=len(results) - len(scored))
    path = _write_manifest(output, manifest)
    run = ScoreRun(
        output=str(output), manifest=str(path), model_uri=model_uri, model_version=model_version, parts=len(parts),
        scored_parts=len(scored), skipped_parts=len(results) - len(scored), rows=sum(rows[p.id] for p in parts),
        seconds=time.perf_counter() - started, worker_pids=sorted({r.pid for r in scored}),
    )  # fmt: skip
    logger.info(
        "score: %d part(s) scored, %d skipped (already complete), %d rows in %.1f s on %s",
        run.scored_parts, run.skipped_parts, run.rows, run.seconds, engine.engine.value,
    )  # fmt: skip
    return run


def read_output(output: Path) -> pd.DataFrame:
    """A scored folder's rows in input order (the manifest's part order)."""
    manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    frames = [pd.read_parquet(output / p["path"]) for p in manifest["parts"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def predict_frame(
    frame: pd.DataFrame, model_uri: str, model_version: str, work: Path, engine: EngineConfig
) -> pd.DataFrame:
    """The model's outputs for ``frame["text"]`` (one row per text, in order), scored in partitions on ``engine``.

    The texts go to ``work/input.parquet`` (one row group per partition), the parts to ``work/parts``;
    a rerun over the same texts and model version skips the parts already written."""
    from finetune_flows.tasks.batch.partitions import plan_partitions

    work.mkdir(parents=True, exist_ok=True)
    source, output = work / "input.parquet", work / "parts"
    frame[["text"]].reset_index(drop=True).to_parquet(source, index=False, row_group_size=engine.partition_rows)
    if (output / MANIFEST).is_file():
        before = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
        if before.get("model_version") != model_version or before.get("model_uri") != model_uri:
            shutil.rmtree(output)  # scored by another version: start again
    run_partitions(plan_partitions(source, "text", engine.partition_rows), model_uri, model_version, output, engine)
    return read_output(output).iloc[:, 1:-1]  # neither the input text nor model_version
