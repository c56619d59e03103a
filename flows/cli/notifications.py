"""The notification automations of ``deployments/automations.yaml``, wired by ``up`` to the user's notification block.

The YAML holds Prefect automations (``AutomationCore``) whose ``send-notification`` actions name
the block as ``notify-block``; ``wire_notifications`` looks the block up by
``<block-type-slug>/<name>`` (``FINETUNE_FLOWS_NOTIFY_BLOCK``), puts its id there, and replaces
any automation of the same name, so ``up`` after an edit updates them instead of adding copies.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from finetune_flows.flows.cli.processes import ServiceError

logger = logging.getLogger(__name__)

AUTOMATIONS_YAML = Path(__file__).resolve().parents[2] / "deployments" / "automations.yaml"
BLOCK_PLACEHOLDER = "notify-block"


def automation_specs(path: Path, block_id: UUID) -> list[Any]:
    """The automations of ``path`` (validated), their ``notify-block`` actions pointing at ``block_id``."""
    from prefect.automations import AutomationCore

    automations = yaml.safe_load(path.read_text(encoding="utf-8"))["automations"]
    for automation in automations:
        for action in automation.get("actions", []):
            if action.get("block_document_id") == BLOCK_PLACEHOLDER:
                action["block_document_id"] = str(block_id)
    return [AutomationCore.model_validate(a) for a in automations]


def wire_notifications(
    prefect_url: str, block: str, auth_string: str | None = None, path: Path = AUTOMATIONS_YAML
) -> list[str]:
    """Create (or replace) the automations of ``path`` with their notifications sent through ``block``; their names."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import ObjectNotFound

    slug, _, name = block.partition("/")
    with SyncPrefectClient(f"{prefect_url}/api", auth_string=auth_string) as client:
        try:
            document = client.read_block_document_by_name(name=name, block_type_slug=slug)
        except ObjectNotFound:
            raise ServiceError(
                f"notification block {block!r} (FINETUNE_FLOWS_NOTIFY_BLOCK) not found on {prefect_url}: create it "
                "in the Prefect UI (Blocks > +) or with its Python class's .save(), or unset the setting"
            ) from None
        specs = automation_specs(path, document.id)
        for spec in specs:
            for old in client.read_automations_by_name(spec.name):
                client.delete_automation(old.id)
            client.create_automation(spec)
    names = [spec.name for spec in specs]
    logger.info("notifications through %s: %s", block, ", ".join(names))
    return names
