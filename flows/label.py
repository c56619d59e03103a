"""Flow ``label``: the texts the champion is least sure of -> people label them in the Prefect UI -> saved -> retrain.

The run picks ``texts`` texts (calibrated uncertainty, diversified; ``tasks/labelling/picking.py``)
and pauses once per batch with a form in the Prefect UI (the run's page: *Resume*). Each answered
batch is saved to the data folder before the next form, so a crash or a timed-out form loses at
most the batch on screen, and a rerun does not ask again about what was answered. At the end,
enough new labels raise ``finetune-flows.data.new-labels``, which the retrain deployment's
trigger turns into a retrain run. Deployments reach it by entrypoint ``flows/label.py:label``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from prefect import flow, pause_flow_run
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.labelling.asking import (
    answers_of,
    form_description,
    label_form,
    request_retraining,
    save_labels,
)
from finetune_flows.tasks.labelling.label_files import PREFIX
from finetune_flows.tasks.labelling.picking import LabelConfig, pick_texts


class LabelSummary(BaseModel):
    """What one labelling run asked, saved and requested."""

    model_config = ConfigDict(frozen=True)

    model_version: str
    pool: int
    asked: int
    labelled: int
    skipped: int
    labels_file: str
    temperature: float
    retrain_event: str | None


@flow(name="label", log_prints=False)
def label(config: LabelConfig) -> LabelSummary:
    """Ask people to label the texts the champion is least sure of, batch by batch, then request retraining."""
    run = str(flow_run.id or "local")[:8]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    candidates = pick_texts(config, str(get_settings().state / "label" / config.model_name / f"{stamp}-{run}"))
    frame = pd.read_parquet(candidates.path)
    labels_file = str(Path(config.data_folder) / f"{PREFIX}{stamp}-{run}.csv")
    batches = max(1, -(-len(frame) // config.batch_size))
    labelled = skipped = 0
    for number, start in enumerate(range(0, len(frame), config.batch_size), start=1):
        part = frame.iloc[start : start + config.batch_size]
        texts = part["text"].tolist()
        form = label_form(candidates.labels, texts, number).with_initial_data(
            description=form_description(texts, number, batches, config.model_name)
        )
        answered = pause_flow_run(
            wait_for_input=form, timeout=config.timeout_minutes * 60, poll_interval=2, key=f"batch-{number}"
        )
        saved = save_labels(
            answers_of(answered, texts, part["uncertainty"].tolist()), answered.labelled_by, config, labels_file,
            candidates.model_version,
        )  # fmt: skip
        labelled, skipped = labelled + saved.labelled, skipped + saved.skipped
    return LabelSummary(
        model_version=candidates.model_version, pool=candidates.pool, asked=len(frame), labelled=labelled,
        skipped=skipped, labels_file=labels_file, temperature=candidates.temperature,
        retrain_event=request_retraining(config),
    )  # fmt: skip
