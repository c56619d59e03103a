"""Retraining: one run per schedule slot trains on a folder of labelled files, warm-starting from the champion.

``plan_retrain`` concatenates the folder's files (cached by their content), pins the champion to
start from (the version the alias names when the run starts) and derives the slot's idempotency
key: the slot (the flow run's scheduled start time, or ``slot``) plus the hashes of the data and
the frozen eval file. A version already tagged with the key is returned instead of training
again (``find_slot_version``), and the key is checked again inside the promotion lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.tasks.core.config import FinetuneConfig, RetrainConfig, validated
from finetune_flows.tasks.core.data_checks import clean_rows, resolve_columns
from finetune_flows.tasks.core.data_preparation import label_map_of
from finetune_flows.tasks.core.secrets import guard
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import file_sha256, read_table
from finetune_flows.tasks.publishing.registry import champion_version, version_with_key

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".txt")


class FinetuneOutcome(BaseModel):
    """The part of a fine-tune run's summary that retraining reports (also built for a reused version)."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    decision: str
    reused_version: bool = False


class RetrainPlan(BaseModel):
    """What this run trains on, where it starts from, and its idempotency key."""

    model_config = ConfigDict(frozen=True)

    files: list[str]
    train_file: str
    key: str
    warm_start: str
    finetune: FinetuneConfig


class RetrainSummary(BaseModel):
    """What one retrain run did."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    decision: str
    key: str
    warm_start: str
    files: list[str]
    reused: bool


def is_data_file(path: Path) -> bool:
    """Whether retraining reads ``path``: a visible file with a table suffix (``.gz`` too)."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.name.lower().removesuffix(".gz").endswith(DATA_SUFFIXES)
    )


def data_files(folder: Path) -> list[Path]:
    """The labelled files in ``folder`` (sorted by name, hidden files skipped)."""
    if not folder.is_dir():
        raise DataError("data folder not found", file=folder, hint="Set data_folder to a folder of labelled files")
    found = sorted(p for p in folder.iterdir() if is_data_file(p))
    if not found:
        raise DataError(f"no labelled files ({', '.join(DATA_SUFFIXES)}, .gz too) in the data folder", file=folder)
    return found


def concatenate(files: list[Path], config: RetrainConfig, out_dir: Path) -> Path:
    """One Parquet file (text, label) of every row of ``files``; named by their content hash, so it is reused."""
    label_map = label_map_of(config.data, config.scenario)
    digest = hashlib.sha256(json.dumps(label_map, sort_keys=True).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    target = out_dir / f"{digest.hexdigest()[:32]}.parquet"
    if target.is_file():
        return target
    scenario = SCENARIOS.get(config.scenario)
    parts = []
    for path in files:
        frame = read_table(path, scenario)
        text_col, label_col = resolve_columns(frame, path, scenario, config.data)
        parts.append(clean_rows(frame, path, text_col, label_col, scenario, label_map)[["text", "label"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    pd.concat(parts, ignore_index=True).to_parquet(partial, index=False)
    partial.replace(target)
    return target


def slot_of(config: RetrainConfig) -> str:
    """The schedule slot: as configured, else the flow run's scheduled start time (UTC, ISO 8601)."""
    if config.slot:
        return config.slot
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.astimezone(UTC).isoformat()


@task(name="plan-retrain")
def plan_retrain(config: RetrainConfig) -> RetrainPlan:
    """Concatenate the data, pin the champion to warm-start from, and derive the slot's idempotency key."""
    import mlflow

    files = data_files(Path(config.data_folder))
    settings = get_settings()
    train_file = concatenate(files, config, settings.cache_dir / "retrain")
    eval_file = Path(config.data.eval_path or "")
    if not eval_file.is_file():
        raise DataError("frozen eval file not found", file=eval_file, hint="Set data.eval_path to a labelled file")
    slot = slot_of(config)
    content = hashlib.sha256(f"{train_file.stem}|{file_sha256(eval_file)}".encode()).hexdigest()[:16]
    key = f"retrain|{config.model_name}|{slot}|{content}"

    mlflow.set_tracking_uri(guard(settings.tracking_uri))
    champion = champion_version(mlflow.MlflowClient(), config.model_name)  # a registry error is raised, not "none"
    if champion is not None:
        warm_start = f"models:/{config.model_name}/{champion}"
    else:
        warm_start = config.model.source
        logger.info("retrain: no champion of %s yet; starting from %s", config.model_name, warm_start)

    values = config.model_dump(mode="json", exclude={"data_folder", "slot"})
    values["data"] = {**values["data"], "train_path": str(train_file), "eval_path": str(eval_file)}
    values["model"] = {**values["model"], "source": warm_start}
    values["registration"] = {**values["registration"], "idempotency_key": key}
    finetune_config = validated(FinetuneConfig, values)  # fields left out take the scenario's defaults
    logger.info("retrain: %d files -> %s; warm start %s; key %s", len(files), train_file, warm_start, key)
    return RetrainPlan(
        files=[str(f) for f in files],
        train_file=str(train_file),
        key=key,
        warm_start=warm_start,
        finetune=finetune_config,
    )


@task(name="find-slot-version")
def find_slot_version(plan: RetrainPlan) -> FinetuneOutcome | None:
    """The version an earlier run registered for this slot and data, if any (so this run trains nothing)."""
    import mlflow

    mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
    client = mlflow.MlflowClient()
    found = version_with_key(client, plan.finetune.model_name, plan.key)
    if found is None:
        return None
    version = str(found.version)
    logger.info("retrain: %s v%s was registered for this slot already", plan.finetune.model_name, version)
    return FinetuneOutcome(
        model_name=plan.finetune.model_name,
        version=version,
        aliases=sorted(client.get_model_version(plan.finetune.model_name, version).aliases),
        decision=f"reused: version {version} was registered for this slot already",
        reused_version=True,
    )


@task(name="report-retrain")
def report_retrain(plan: RetrainPlan, result: FinetuneOutcome) -> RetrainSummary:
    """The run's summary, also as a markdown artifact (slot key, data, warm start, decision)."""
    summary = RetrainSummary(
        model_name=result.model_name,
        version=result.version,
        aliases=result.aliases,
        decision=result.decision,
        key=plan.key,
        warm_start=plan.warm_start,
        files=plan.files,
        reused=result.reused_version,
    )
    files = "\n".join(f"- `{f}`" for f in plan.files)
    create_markdown_artifact(
        key=f"{plan.finetune.scenario}-retrain",
        description="Retraining: data, warm start and promotion decision",
        markdown=(
            f"### {summary.model_name} version {summary.version}{' (reused)' if summary.reused else ''}\n\n"
            f"aliases: {', '.join(summary.aliases) or 'none'}\n\n**decision: {summary.decision}**\n\n"
            f"warm start: `{plan.warm_start}`; slot key `{plan.key}`\n\ntrained on:\n{files}"
        ),
    )
    return summary
