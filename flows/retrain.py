"""Flow ``retrain``: scheduled retraining that warm-starts from the champion and promotes only on improvement.

One run trains on every labelled file in ``data_folder`` (concatenated), starting from
``models:/<name>@champion`` (the version pinned when the run starts), scores the challenger and
the champion on the same frozen eval file, and moves ``champion`` only when the challenger is
better by more than the margin; the evidence is recorded as version tags (see tasks/publishing/promotion.py).

A run is idempotent per schedule slot: its key is the slot (the flow run's scheduled start time,
or ``slot``) plus the hashes of the data and the eval file. A version already tagged with the key
is returned instead of training again, and the key is checked again inside the promotion lock,
so two runs of one slot that both got past the first check still register one version.

Its parameters are the fine-tune flow's (``RetrainConfig`` extends ``FinetuneConfig``) plus the data folder and
the slot. Deployments reach it by entrypoint ``flows/retrain.py:retrain``.
"""

from __future__ import annotations

from prefect import flow

from finetune_flows.flows.finetune import finetune
from finetune_flows.tasks.core.config import RetrainConfig
from finetune_flows.tasks.core.failures import stage_failed
from finetune_flows.tasks.core.retraining import (
    FinetuneOutcome,
    RetrainSummary,
    find_slot_version,
    plan_retrain,
    report_retrain,
)


@flow(name="retrain", log_prints=False)
def retrain(config: RetrainConfig) -> RetrainSummary:
    """Retrain on every file in the data folder from the champion; promote only if it beats the champion."""
    try:
        plan = plan_retrain(config)
        found = find_slot_version(plan)
        result = found or FinetuneOutcome.model_validate(finetune(plan.finetune).model_dump())
        return report_retrain(plan, result)
    except Exception as exc:
        return stage_failed(exc, [plan_retrain, find_slot_version, finetune, report_retrain])
