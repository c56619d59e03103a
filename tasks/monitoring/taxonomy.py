"""The topic taxonomy as finetune-flows validates it: the served model's check, raising ``ConfigError``.

``tasks.serving.topics`` parses and validates taxonomies inside registered models, where
finetune-flows is not installed, so it raises ``ModelFilesError``; a user editing a taxonomy gets
the same messages as a ``ConfigError`` from here, which the CLI reports like any other setting.
"""

from __future__ import annotations

from pathlib import Path

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.serving import topics
from finetune_flows.tasks.serving.errors import ModelFilesError
from finetune_flows.tasks.serving.topics import Taxonomy

DEFAULT_TAXONOMY = Path(__file__).resolve().parents[2] / "plugins/scenarios/data/financial_phrasebank/topics.json"


def load_taxonomy(path: str | Path = DEFAULT_TAXONOMY) -> Taxonomy:
    """Read and validate a taxonomy JSON file; every problem is reported at once, with the file."""
    try:
        return topics.load_taxonomy(path)
    except ModelFilesError as exc:
        raise ConfigError(str(exc)) from exc
