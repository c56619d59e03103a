"""Resuming an interrupted run: find its folder, check nothing works on it, and re-open its MLflow run.

``finetune-flows resume RUN`` (or a flow run with ``resume`` set) continues a run that was killed or
failed: the same run folder, the same MLflow run and the same config (read from the folder's
``run.json``). The stages before training are cached, training continues from the last complete
checkpoint (``checkpoints.resume_point``) or keeps the model of a training that had finished, and
registration returns the version this run already published, if it got that far. A folder still
held by a live process (``tracking.hold_run_folder``) is refused; the Prefect flow runs that worked
on the folder and never ended (killed with ``kill -9``) are marked Crashed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.overrides import set_dotted, validated
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tracking import (
    RUN_RECORD,
    RunInfo,
    RunRecord,
    hold_run_folder,
    tracking_uri_for,
    write_run_record,
)

logger = logging.getLogger(__name__)

AFTER_TRAINING = ("export.", "evaluation.", "registration.")
"""Config sections only the stages after training read: a resume may change them (e.g. a parity tolerance)."""


def find_run_dir(run: str, runs_dir: Path | None = None) -> Path:
    """The run folder ``run`` names: a folder name under ``runs_dir``, a path, or an MLflow run id."""
    runs = runs_dir or get_settings().runs_dir
    for candidate in (runs / run, Path(run)):
        if (candidate / RUN_RECORD).is_file():
            return candidate.resolve()
    for record in sorted(runs.glob(f"*/{RUN_RECORD}")):
        if RunRecord.model_validate_json(record.read_text(encoding="utf-8")).run.run_id == run:
            return record.parent.resolve()
    known = sorted(p.parent.name for p in runs.glob(f"*/{RUN_RECORD}"))[-5:]
    raise ConfigError(
        f"no run folder or MLflow run id {run!r} in {runs} (newest: {', '.join(known) or 'none'}); "
        "runs started before finetune-flows kept run.json cannot be resumed"
    )


def read_run_record(run_dir: Path) -> RunRecord:
    """The ``run.json`` of ``run_dir``."""
    return RunRecord.model_validate_json((run_dir / RUN_RECORD).read_text(encoding="utf-8"))


def resume_config(run: str, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """The config of run ``run`` (folder name, path or MLflow run id), set to resume it; ``overrides`` (dotted keys)
    may change what only the stages after training read (``AFTER_TRAINING``)."""
    run_dir = find_run_dir(run)
    values = {**read_run_record(run_dir).config, "resume": run_dir.name}
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value)
    return validated(FinetuneConfig, values)


def changed_fields(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dumps."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_fields(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def crash_flow_runs(flow_run_ids: list[str], resumed_by: str | None) -> list[str]:
    """Mark the flow runs among ``flow_run_ids`` that never ended Crashed (their process was killed); the marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    marked = []
    message = f"its process ended without reporting (killed); resumed by flow run {resumed_by}"
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                parent = client.read_flow_run(UUID(flow_run_id))
            except ObjectNotFound:
                continue  # another Prefect database
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
            )
            for run in [parent, *subflows]:
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    marked.append(str(run.id))
    return marked


@task(name="reopen-run")
def reopen_run(config: FinetuneConfig) -> RunInfo:
    """Take over the run folder ``config.resume`` names (refused while a live process holds it) and re-open its
    MLflow run; the config must be the run's own."""
    from mlflow import MlflowClient
    from prefect.runtime import flow_run

    from finetune_flows.tasks.core.preflight import check_before_run

    assert config.resume is not None, "reopen_run is for a resume"
    check_before_run(config)
    run_dir = find_run_dir(config.resume)
    record = read_run_record(run_dir)
    changed = changed_fields(
        {k: v for k, v in record.config.items() if k != "resume"}, config.model_dump(mode="json", exclude={"resume"})
    )
    fixed = [name for name in changed if not name.startswith(AFTER_TRAINING)]
    if fixed:
        raise ConfigError(
            f"resume {run_dir.name}: the config differs from the run's own in {', '.join(fixed)}; "
            f"`finetune-flows resume {run_dir.name}` reads it from {run_dir / RUN_RECORD} (only "
            f"{', '.join(p.rstrip('.') + '.*' for p in AFTER_TRAINING)} may change on a resume)"
        )
    if changed:
        logger.info("resume %s with changed %s", run_dir.name, ", ".join(changed))
    hold_run_folder(run_dir)
    run = record.run
    client = MlflowClient(tracking_uri=tracking_uri_for(run))
    previous = client.get_run(run.run_id)
    resumes = int(previous.data.tags.get("resumes", "0")) + 1
    client.update_run(run.run_id, status="RUNNING")
    client.set_tag(run.run_id, "resumes", str(resumes))
    if "failed_stage" in previous.data.tags:
        client.delete_tag(run.run_id, "failed_stage")
    crashed = crash_flow_runs(record.flow_run_ids, str(flow_run.id) if flow_run.id else None)
    write_run_record(run, config)
    logger.info(
        "resuming run %s (MLflow run %s, was %s; resume %d)%s", run_dir.name, run.run_id, previous.info.status,
        resumes, f"; marked {len(crashed)} flow runs that never ended Crashed" if crashed else "",
    )  # fmt: skip
    return run
