"""New labelled files in a data folder, as Prefect events: what the retrain trigger listens to.

Prefect has no file watcher, so a scheduled flow (``watch-data``) compares the folder's labelled
files (the ones retraining reads: ``tasks.core.retraining.is_data_file``) with
the ones it saw last time, recorded in ``<data_folder>/.seen-files.json`` by name and content hash.
Each new or changed file raises one ``finetune-flows.data.new-file`` event about the model
(resource ``model.<model_name>``). The ``label`` flow's own files (``labels-*.csv``) are left to it:
it announces them once ``retrain_after`` labels have arrived, not after every batch. The record is
written after the events, so a run that dies in between announces those files again rather than
never; the retrain trigger's ``within`` window absorbs the repeat.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import task
from prefect.events import emit_event
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.tasks.core.retraining import is_data_file
from finetune_flows.tasks.core.tables import file_sha256
from finetune_flows.tasks.labelling.label_files import PREFIX

logger = logging.getLogger(__name__)

NEW_FILE_EVENT = "finetune-flows.data.new-file"
SEEN_FILE = ".seen-files.json"


class WatchConfig(BaseModel):
    """Announce new labelled files in a model's data folder, so that its retrain deployment can start on them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(default="finance-monitoring", min_length=1, max_length=200, description="Registered model.")
    data_folder: str = Field(min_length=1, max_length=1000, description="The folder its retrain deployment trains on.")


class Arrivals(BaseModel):
    """The files announced by one watch run."""

    model_config = ConfigDict(frozen=True)

    files: list[str]
    events: list[str]
    watched: int


def labelled_files(folder: Path) -> dict[str, str]:
    """Name -> sha256 of the visible labelled files in ``folder`` but the label flow's (none if it does not exist)."""
    if not folder.is_dir():
        return {}
    return {
        p.name: file_sha256(p) for p in sorted(folder.iterdir()) if is_data_file(p) and not p.name.startswith(PREFIX)
    }


def new_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """(names that are new or changed since the last record, the folder's files now)."""
    now = labelled_files(folder)
    record = folder / SEEN_FILE
    seen = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    return [name for name, digest in now.items() if seen.get(name) != digest], now


def remember(folder: Path, files: dict[str, str]) -> None:
    """Record ``files`` as seen (atomically)."""
    partial = folder / f"{SEEN_FILE}.partial"
    partial.write_text(json.dumps(files, indent=1, sort_keys=True), encoding="utf-8")
    partial.replace(folder / SEEN_FILE)


@task(name="announce-new-files")
def announce_new_files(config: WatchConfig) -> Arrivals:
    """One ``finetune-flows.data.new-file`` event per new or changed labelled file, then remember them."""
    folder = Path(config.data_folder)
    fresh, now = new_files(folder)
    events = []
    for name in fresh:
        event = emit_event(
            event=NEW_FILE_EVENT,
            resource={"prefect.resource.id": f"model.{config.model_name}", "prefect.resource.name": config.model_name},
            payload={"file": name, "sha256": now[name], "data_folder": config.data_folder},
        )
        if event is not None:
            events.append(str(event.id))
    if folder.is_dir():
        remember(folder, now)
    logger.info("%d new labelled file(s) of %d in %s: %s", len(fresh), len(now), folder, ", ".join(fresh) or "-")
    return Arrivals(files=fresh, events=events, watched=len(now))
