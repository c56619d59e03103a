"""Flow ``retrain``: scheduled retraining that warm-starts from the champion and promotes only on improvement.

One run trains on every labelled file in ``data_folder`` (concatenated), starting from
``models:/<name>@champion`` (the version pinned when the run starts), scores the challenger and
the champion on the same frozen eval file, and moves ``champion`` only when the challenger is
better by more than the margin; the evidence is recorded as version tags (see tasks/promotion.py).

A run is idempotent per schedule slot: its key is the slot (the flow run's scheduled start time,
or ``slot``) plus the hashes of the data and the eval file. A version already tagged with the key
is returned instead of training again, and the key is checked again inside the promotion lock,
so two runs of one slot that both got past the first check still register one version.

Deployments reach it by entrypoint ``flows/retrain.py:retrain``.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune_flows.flows.finetune import FinetuneSummary, finetune
from finetune_flows.flows.train import stage_failed
from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.tasks.core.config import MINILM, FinetuneConfig, TrainingConfig, known_scenario, validated
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import clean_rows, file_sha256, read_table, resolve_columns
from finetune_flows.tasks.publishing.promotion import CHAMPION, version_with_key

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".txt")


class RetrainConfig(BaseModel):
    """Retrain a scenario's model on a folder of labelled files; promote only on a frozen eval file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scenario: str = Field(default="sentiment", description="Scenario plugin (see `finetune-flows plugins`).")
    data_folder: str = Field(
        min_length=1, description="Folder of labelled files (CSV, TSV, JSONL, Parquet; .gz too): all are trained on."
    )
    eval_path: str = Field(
        min_length=1, description="Frozen eval file: the challenger and the champion are both scored on it."
    )
    model_name: str | None = Field(
        default=None, max_length=200, description="Registered model name. Empty: the scenario's name."
    )
    base_model: str = Field(
        default=MINILM,
        min_length=1,
        max_length=500,
        description="Model source for the first version, when there is no champion to warm-start from yet.",
    )
    text_column: str | None = Field(default=None, description="Text column. Empty: the scenario's layouts.")
    label_column: str | None = Field(default=None, description="Label column. Empty: as the layout says.")
    max_length: int | None = Field(
        default=None, ge=8, le=512, description="Tokens kept per text. Empty: the scenario's default."
    )
    training: TrainingConfig | None = Field(default=None, description="Optimisation. Empty: the scenario's defaults.")
    train_on: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^[^/]+/[^/]+$",
        description="Run the training stage as deployment '<flow>/<deployment>' (the gpu pool); empty: in this run.",
    )
    promotion_margin: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Promote when the challenger beats the champion by more than this."
    )
    slot: str | None = Field(
        default=None,
        max_length=100,
        description="The schedule slot this run retrains for. Empty: the flow run's scheduled start time.",
    )

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, value: str) -> str:
        return known_scenario(value)

    @property
    def registered_name(self) -> str:
        return self.model_name or self.scenario


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


def data_files(folder: Path) -> list[Path]:
    """The labelled files in ``folder`` (sorted by name, hidden files skipped)."""
    if not folder.is_dir():
        raise DataError("data folder not found", file=folder, hint="Set data_folder to a folder of labelled files")
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().removesuffix(".gz").endswith(DATA_SUFFIXES)
    )
    if not found:
        raise DataError(f"no labelled files ({', '.join(DATA_SUFFIXES)}, .gz too) in the data folder", file=folder)
    return found


def concatenate(files: list[Path], config: RetrainConfig, out_dir: Path) -> Path:
    """One Parquet file (text, label) of every row of ``files``; named by their content hash, so it is reused."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    target = out_dir / f"{digest.hexdigest()[:32]}.parquet"
    if target.is_file():
        return target
    scenario = SCENARIOS.get(config.scenario)
    parts = []
    for path in files:
        frame = read_table(path, scenario)
        text_col, label_col = resolve_columns(frame, path, scenario, config)
        parts.append(clean_rows(frame, path, text_col, label_col, scenario)[["text", "label"]])
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
    from mlflow.exceptions import MlflowException

    files = data_files(Path(config.data_folder))
    settings = get_settings()
    train_file = concatenate(files, config, settings.cache_dir / "retrain")
    eval_file = Path(config.eval_path)
    if not eval_file.is_file():
        raise DataError("frozen eval file not found", file=eval_file, hint="Set eval_path to a labelled file")
    slot = slot_of(config)
    content = hashlib.sha256(f"{train_file.stem}|{file_sha256(eval_file)}".encode()).hexdigest()[:16]
    key = f"retrain|{config.registered_name}|{slot}|{content}"

    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        champion = mlflow.MlflowClient().get_model_version_by_alias(config.registered_name, CHAMPION)
        warm_start = f"models:/{config.registered_name}/{champion.version}"
    except MlflowException:
        warm_start = config.base_model
        logger.info("retrain: no champion of %s yet; starting from %s", config.registered_name, warm_start)

    values = {
        "scenario": config.scenario,
        "data": {"train_path": str(train_file), "eval_path": str(eval_file)},
        "model": {"source": warm_start, **({"max_length": config.max_length} if config.max_length else {})},
        "registration": {
            "model_name": config.model_name,
            "promotion_margin": config.promotion_margin,
            "idempotency_key": key,
        },
    }
    training = config.training.model_dump() if config.training else {}
    if config.train_on:
        training["train_on"] = config.train_on
    if training:
        values["training"] = training
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
def find_slot_version(plan: RetrainPlan) -> FinetuneSummary | None:
    """The version an earlier run registered for this slot and data, if any (so this run trains nothing)."""
    import mlflow

    mlflow.set_tracking_uri(get_settings().tracking_uri)
    client = mlflow.MlflowClient()
    found = version_with_key(client, plan.finetune.model_name, plan.key)
    if found is None:
        return None
    version = str(found.version)
    logger.info("retrain: %s v%s was registered for this slot already", plan.finetune.model_name, version)
    return FinetuneSummary(
        model_name=plan.finetune.model_name,
        version=version,
        aliases=sorted(client.get_model_version(plan.finetune.model_name, version).aliases),
        decision=f"reused: version {version} was registered for this slot already",
        metrics={},
        onnx_path="",
        run_id=str(found.run_id),
        reused_ingest=True,
        reused_tokens=True,
        train_seconds=0.0,
        reused_version=True,
    )


@task(name="report-retrain")
def report_retrain(plan: RetrainPlan, result: FinetuneSummary) -> RetrainSummary:
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


@flow(name="retrain", log_prints=False)
def retrain(config: RetrainConfig) -> RetrainSummary:
    """Retrain on every file in the data folder from the champion; promote only if it beats the champion."""
    try:
        plan = plan_retrain(config)
        result = find_slot_version(plan) or finetune(plan.finetune)
        return report_retrain(plan, result)
    except Exception as exc:
        return stage_failed(exc, [plan_retrain, find_slot_version, finetune, report_retrain])
