"""Promotion: the ``champion`` alias moves only inside a lock, after re-reading the champion's metric.

Two runs that finish together (two workers, a scheduled retrain and a manual finetune) must not
both read "champion 0.80", both decide to promote, and leave the alias on whichever wrote last.
So registering a version and moving ``champion`` happen inside ``promotion_lock(model_name)``: a
Prefect global concurrency limit with one slot, ``promote-<model>``, held through the Prefect API
every flow run already talks to (the embedded local server of ``finetune-flows run`` included;
in production the shared Prefect server, so it holds across workers and machines).

Inside the lock the champion is read again: its metric comes from its own version tags when it
was measured on the same eval set (same ``eval_hash``), else the caller re-scores it. A retrain
slot's idempotency key is checked inside the same lock, so a duplicate run returns the version
the first one registered.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
KEY_TAG = "idempotency_key"
LOCK_TIMEOUT_SECONDS = 1800.0

Rescore = Callable[[str], tuple[float | None, str]]
"""Scores champion version ``v`` on the caller's eval set: (metric or None, note)."""


class Candidate(BaseModel):
    """A registered version asking to become champion."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    primary_metric: str
    metric: float
    eval_hash: str
    margin: float = 0.0


class Decision(BaseModel):
    """What the promotion gate decided, and on which evidence."""

    model_config = ConfigDict(frozen=True)

    promoted: bool
    decision: str
    champion_version: str | None
    champion_metric: float | None


def lock_name(model_name: str) -> str:
    """The global concurrency limit guarding one registered model's aliases."""
    return "promote-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)


@contextmanager
def promotion_lock(model_name: str, timeout_seconds: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold the model's one-slot Prefect global concurrency limit (created on first use)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = lock_name(model_name)
    # suppress: another run may create the limit between this one's read and create
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        logger.info("promotion lock %s held", name)
        yield


def decide(challenger: float, champion: float | None, margin: float, note: str) -> tuple[bool, str]:
    """Promote when there is no comparable champion metric, or the challenger beats it by more than ``margin``.

    Both metrics are compared at the 6 decimals the version tags record, so a re-read champion
    and a challenger with the same score tie.
    """
    if champion is None:
        if "not comparable" in note:
            return False, f"kept champion: {note}"
        return True, "promoted: no champion yet"
    if round(challenger, 6) > round(champion, 6) + margin:
        return True, f"promoted: {challenger:.4f} > champion {champion:.4f} + margin {margin:g}"
    return False, f"kept champion: {challenger:.4f} <= champion {champion:.4f} + margin {margin:g}"


def metric_tag(primary_metric: str) -> str:
    """The version tag holding a version's own primary metric on its eval set."""
    return f"challenger.{primary_metric}"


def read_champion(
    client: Any, candidate: Candidate, rescore: Rescore | None = None
) -> tuple[str | None, float | None, str]:
    """(version, metric, note) of the current champion, comparable with ``candidate``'s metric."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(candidate.model_name, CHAMPION)
    except MlflowException:
        return None, None, "no champion yet"
    version, tags = str(champion.version), dict(champion.tags or {})
    recorded = tags.get(metric_tag(candidate.primary_metric))
    if tags.get("eval_hash") == candidate.eval_hash and recorded not in (None, "none"):
        return version, float(str(recorded)), "recorded on the same eval set"
    if rescore is None:
        return version, None, "champion was measured on another eval set and cannot be re-scored; not comparable"
    metric, note = rescore(version)
    return version, metric, note


def promote_locked(client: Any, candidate: Candidate, rescore: Rescore | None = None) -> Decision:
    """With the lock held: re-read the champion, decide, record the evidence as tags, then move the alias."""
    champion_version, champion_value, note = read_champion(client, candidate, rescore)
    if champion_version == candidate.version:
        return Decision(promoted=False, decision="already champion", champion_version=None, champion_metric=None)
    promote, decision = decide(candidate.metric, champion_value, candidate.margin, note)
    evidence = {
        "champion.version": champion_version or "none",
        f"champion.{candidate.primary_metric}": "none" if champion_value is None else f"{champion_value:.6f}",
        "promotion.margin": f"{candidate.margin:g}",
        "promotion.decision": decision,
    }
    for key, value in evidence.items():
        client.set_model_version_tag(candidate.model_name, candidate.version, key, value)
    if promote:  # last step: everything before it can fail without having moved the champion
        client.set_registered_model_alias(candidate.model_name, CHAMPION, candidate.version)
    logger.info("promotion of %s v%s: %s", candidate.model_name, candidate.version, decision)
    return Decision(
        promoted=promote, decision=decision, champion_version=champion_version, champion_metric=champion_value
    )


def promote_version(candidate: Candidate, rescore: Rescore | None = None) -> Decision:
    """Take the model's promotion lock and run the gate for ``candidate`` (safe when runs finish together)."""
    import mlflow

    with promotion_lock(candidate.model_name):
        return promote_locked(mlflow.MlflowClient(), candidate, rescore)


def version_with_key(client: Any, model_name: str, key: str) -> Any | None:
    """The model version tagged ``idempotency_key=key``, or None (call with the lock held to be sure)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    matches = sorted((v for v in found if (v.tags or {}).get(KEY_TAG) == key), key=lambda v: int(v.version))
    return matches[0] if matches else None
