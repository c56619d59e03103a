"""Reply templates per intent, shipped with an intent classifier (a ``BEFORE_REGISTER`` stage).

A scenario that offers templates (``ScenarioBase.answer_templates``: a CSV ``intent,reply,link``)
declares ``ship_answer_templates`` as an extra stage. Before registration the file is read and
checked (one non-empty reply per intent, no intent twice, a reply for every label the model
predicts), copied into the run folder and registered with the served model under
``ANSWERS_ARTIFACT``; the version is tagged with the file's name, sha256 and intent count.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune_flows.plugins import SCENARIOS, ConfigError, DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.tasks.core.stages import StageContext, StageOutput

logger = logging.getLogger(__name__)

ANSWERS_ARTIFACT = "answers"
"""Artifact name of the templates file inside the registered model."""
COLUMNS = ("intent", "reply", "link")


@dataclass(frozen=True)
class Answer:
    """The default reply to one intent and the name of the help page it points to ("" when none)."""

    reply: str
    link: str = ""


def read_answers(path: Path) -> dict[str, Answer]:
    """The templates in ``path`` (CSV with a header ``intent,reply[,link]``), intent -> answer; a bad row is a
    ``DataError`` naming file, row, column and value."""
    import pandas as pd

    if not path.is_file():
        raise DataError("answer templates file not found", file=path)
    try:
        frame = pd.read_csv(io.StringIO(decode_utf8(path, path.read_bytes())), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot parse as CSV: {exc}", file=path) from exc
    for column in COLUMNS[:2]:
        if column not in frame.columns:
            raise DataError(f"missing column {column!r}; columns found: {list(frame.columns)}", file=path)
    links = frame["link"] if "link" in frame.columns else pd.Series([""] * len(frame))
    answers: dict[str, Answer] = {}
    for row, (intent, reply, link) in enumerate(zip(frame["intent"], frame["reply"], links, strict=True), start=1):
        intent, reply = intent.strip(), reply.strip()
        if not intent:
            raise DataError("empty intent", file=path, row=row, column="intent", value=intent)
        if intent in answers:
            raise DataError("intent listed twice", file=path, row=row, column="intent", value=intent)
        if not reply:
            raise DataError("empty reply", file=path, row=row, column="reply", value=reply)
        answers[intent] = Answer(reply=reply, link=str(link).strip())
    if not answers:
        raise DataError("no templates: the file has a header only", file=path)
    return answers


def check_coverage(answers: dict[str, Answer], labels: list[str], path: Path) -> None:
    """Every label the model predicts has a reply, or a ``DataError`` listing those without one."""
    missing = [label for label in labels if label not in answers]
    if missing:
        raise DataError(
            f"no reply for {len(missing)} of the model's {len(labels)} labels: {missing}",
            file=path,
            hint="Add a row (intent,reply,link) for each",
        )


def file_digest(path: Path) -> str:
    """The sha256 of ``path``'s bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ship_answer_templates(context: StageContext) -> StageOutput:
    """The scenario's templates, checked against the run's labels and copied into the run: served with the model."""
    config = context.config
    templates = getattr(SCENARIOS.get(config.scenario), "answer_templates", lambda: None)()
    if templates is None or context.data is None:
        raise ConfigError(f"scenario {config.scenario!r} declares the answer-templates stage but no templates file")
    source = Path(templates)
    answers = read_answers(source)
    check_coverage(answers, context.data.labels, source)
    shipped = Path(context.run.run_dir) / "answers" / source.name
    shipped.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, shipped)
    logger.info("answer templates: %d intents from %s", len(answers), source)
    return StageOutput(
        tags={"answers": source.name, "answers.sha256": file_digest(shipped), "answers.intents": str(len(answers))},
        served_artifacts={ANSWERS_ARTIFACT: str(shipped)},
    )
