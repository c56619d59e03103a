"""Label, stages 2-3: the form a person answers in the Prefect UI, saving the answers, requesting retraining.

Each batch is a ``RunInput`` built for its texts: who is labelling, then one choice per text
among the model's labels and ``skip`` (a drop-down in the Prefect UI, titled with the text; a long
text is cut there and shown whole below, and all of them are listed in the form's Markdown). The
paused run resumes when the form is submitted. Answers are saved before the next form is shown
(``label_files.py``). When the labels that arrived since the last request reach ``retrain_after``,
a ``finetune-flows.data.new-labels`` event about the model (resource ``model.<model_name>``, the
folder in its payload) goes out; the model's retrain deployment has a trigger that starts a run on it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from prefect import task
from prefect.events import emit_event
from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field, create_model

from finetune_flows.tasks.labelling.label_files import (
    LABEL_COLUMNS,
    SKIPS_FILE,
    append_rows,
    label_count,
    labels_at_last_request,
    record_request,
)
from finetune_flows.tasks.labelling.picking import LabelConfig

logger = logging.getLogger(__name__)

SKIP = "skip"
NEW_LABELS_EVENT = "finetune-flows.data.new-labels"
TITLE_CHARS = 90


class Answer(BaseModel):
    """One answered text."""

    model_config = ConfigDict(frozen=True)

    text: str
    label: str
    uncertainty: float


class SavedBatch(BaseModel):
    """What saving one batch wrote."""

    model_config = ConfigDict(frozen=True)

    labels_file: str
    labelled: int
    skipped: int


def label_form(labels: list[str], texts: list[str], batch: int) -> type[RunInput]:
    """A ``RunInput`` with ``labelled_by`` and one ``text_<i>`` choice (the labels and ``skip``) per text."""
    choice = Enum(f"Choice{batch}", {name: name for name in [*labels, SKIP]}, type=str)  # type: ignore[misc]
    fields: dict[str, Any] = {
        "labelled_by": (
            str,
            Field(
                min_length=1,
                max_length=100,
                title="Labelled by",
                description="Your name or e-mail, saved with each label.",
            ),
        ),
    }
    for number, text in enumerate(texts, start=1):
        whole = len(text) <= TITLE_CHARS  # a longer text is cut in the title and shown whole below it
        title = f"{number}. {text if whole else text[: TITLE_CHARS - 3] + '...'}"
        fields[f"text_{number}"] = (choice, Field(default=SKIP, title=title, description=None if whole else text))
    return create_model(f"LabelBatch{batch}", __base__=RunInput, **fields)


def form_description(texts: list[str], batch: int, batches: int, model: str) -> str:
    """The Markdown shown above the form."""
    lines = [
        f"### Label batch {batch} of {batches}",
        "",
        f"The {len(texts)} texts below are ones `{model}` is least sure of. Choose the right label for each, "
        f"or `{SKIP}` when none fits or you cannot tell; skipped texts are not asked again. Submit to save them.",
        "",
    ]
    lines += [f"{number}. {text}" for number, text in enumerate(texts, start=1)]
    return "\n".join(lines)


def answers_of(form: BaseModel, texts: list[str], uncertainty: list[float]) -> list[Answer]:
    """The form's choices as answers, in text order."""
    values = form.model_dump()
    return [
        Answer(text=text, label=str(getattr(values[f"text_{n}"], "value", values[f"text_{n}"])), uncertainty=u)
        for n, (text, u) in enumerate(zip(texts, uncertainty, strict=True), start=1)
    ]


@task(name="save-labels")
def save_labels(
    answers: list[Answer], labelled_by: str, config: LabelConfig, labels_file: str, model_version: str
) -> SavedBatch:
    """Append the batch's labels to this run's label file and its skips to the skip list, each atomically."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    labelled = [a for a in answers if a.label != SKIP]
    rows = [
        {"text": a.text, "label": a.label, "labelled_by": labelled_by, "labelled_at": now,
         "model_version": model_version, "uncertainty": round(a.uncertainty, 4)}
        for a in labelled
    ]  # fmt: skip
    if rows:
        append_rows(Path(labels_file), rows, LABEL_COLUMNS)
    skipped = [{"text": a.text, "skipped_by": labelled_by, "skipped_at": now} for a in answers if a.label == SKIP]
    if skipped:
        append_rows(Path(config.data_folder) / SKIPS_FILE, skipped, ["text", "skipped_by", "skipped_at"])
    logger.info("saved %d label(s) to %s; %d skipped", len(rows), labels_file, len(skipped))
    return SavedBatch(labels_file=labels_file, labelled=len(rows), skipped=len(skipped))


@task(name="request-retraining")
def request_retraining(config: LabelConfig) -> str | None:
    """A ``finetune-flows.data.new-labels`` event when ``retrain_after`` labels arrived since the last one; its id."""
    folder = Path(config.data_folder)
    total, before = label_count(folder), labels_at_last_request(folder)
    if config.retrain_after == 0 or total - before < config.retrain_after:
        logger.info("%d new label(s) since the last retraining request; %d needed", total - before,
                    config.retrain_after)  # fmt: skip
        return None
    event = emit_event(
        event=NEW_LABELS_EVENT,
        resource={"prefect.resource.id": f"model.{config.model_name}", "prefect.resource.name": config.model_name},
        payload={"labels": total, "new_labels": total - before, "data_folder": config.data_folder},
    )
    record_request(folder, total)
    logger.info("requested retraining: %d new label(s) in %s", total - before, folder)
    return None if event is None else str(event.id)
