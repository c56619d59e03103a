"""Promotion: the ``champion`` alias moves only inside a lock, after re-reading the champion's metric.

Two runs that finish together (two workers, a scheduled retrain and a manual finetune) must not
both read "champion 0.80", both decide to promote, and leave the alias on whichever wrote last.
So registering a version and moving ``champion`` happen inside ``promotion_lock(model_name)``: a
Prefect global concurrency limit with one slot, ``promote-<model>``, held through the Prefect API
every flow run already talks to (the embedded local server of ``finetune-flows run`` included;
in production the shared Prefect server, so it holds across workers and machines).

Inside the lock the champion is read again: its metric comes from its own version tags when it
was measured on the same eval set (same ``eval_hash``), else the caller's ``Rescore`` measures it
there, or says why it cannot (``NotComparable``). The gate's result is a typed ``Outcome``; the
human message beside it is for tags, logs and artifacts, never parsed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.publishing.registry import (
    CHALLENGER,
    CHAMPION,
    KEY_TAG,
    PREVIOUS_CHAMPION_TAG,
    champion_version,
    registry_step,
    version_with_key,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "KEY_TAG",
    "Candidate",
    "Champion",
    "Decision",
    "NotComparable",
    "Outcome",
    "Rescore",
    "decide",
    "metric_tag",
    "promote_locked",
    "promote_version",
    "promotion_lock",
    "read_champion",
    "version_with_key",
]

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_SECONDS = 1800.0


class Outcome(StrEnum):
    """What publishing a version decided about ``champion``."""

    PROMOTED_FIRST = "promoted_first"  # there was no champion
    PROMOTED_BETTER = "promoted_better"  # beat the champion by more than the margin
    KEPT_NOT_BETTER = "kept_not_better"
    KEPT_NOT_COMPARABLE = "kept_not_comparable"  # the champion cannot be measured on this eval set
    ALREADY_CHAMPION = "already_champion"
    REUSED = "reused"  # an earlier run registered this idempotency key; nothing was decided now

    @property
    def promoted(self) -> bool:
        """True when this decision moved ``champion`` to the candidate."""
        return self in (Outcome.PROMOTED_FIRST, Outcome.PROMOTED_BETTER)


class NotComparable(BaseModel):
    """A rescore's answer when the champion cannot be measured on the candidate's eval set."""

    model_config = ConfigDict(frozen=True)

    reason: str


Rescore = Callable[[str], float | NotComparable]
"""Measures champion version ``v`` on the caller's eval set: its primary metric, or why it cannot."""


class Candidate(BaseModel):
    """A registered version asking to become champion."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    primary_metric: str
    metric: float
    eval_hash: str
    margin: float = 0.0


class Champion(BaseModel):
    """The current champion as the gate sees it."""

    model_config = ConfigDict(frozen=True)

    version: str
    metric: float | None
    """Its primary metric on the candidate's eval set; None when it cannot be measured there."""
    basis: str
    """How the metric was obtained, or why it is not comparable."""


class Decision(BaseModel):
    """What the promotion gate decided, and on which evidence."""

    model_config = ConfigDict(frozen=True)

    outcome: Outcome
    decision: str
    """The message recorded as tag ``promotion.decision`` (for people; decide on ``outcome``)."""
    champion_version: str | None
    champion_metric: float | None

    @property
    def promoted(self) -> bool:
        """True when ``champion`` moved to the candidate."""
        return self.outcome.promoted


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


def decide(challenger: float, champion: Champion | None, margin: float) -> tuple[Outcome, str]:
    """Promote when there is no champion, or the challenger beats its comparable metric by more than ``margin``.

    Both metrics are compared at the 6 decimals the version tags record, so a re-read champion
    and a challenger with the same score tie.
    """
    if champion is None:
        return Outcome.PROMOTED_FIRST, "promoted: no champion yet"
    if champion.metric is None:
        return Outcome.KEPT_NOT_COMPARABLE, f"kept champion: v{champion.version} is not comparable ({champion.basis})"
    if round(challenger, 6) > round(champion.metric, 6) + margin:
        return (
            Outcome.PROMOTED_BETTER,
            f"promoted: {challenger:.4f} > champion {champion.metric:.4f} + margin {margin:g}",
        )
    return (
        Outcome.KEPT_NOT_BETTER,
        f"kept champion: {challenger:.4f} <= champion {champion.metric:.4f} + margin {margin:g}",
    )


def metric_tag(primary_metric: str) -> str:
    """The version tag holding a version's own primary metric on its eval set."""
    return f"challenger.{primary_metric}"


def read_champion(client: Any, candidate: Candidate, rescore: Rescore | None = None) -> Champion | None:
    """The current champion, measured comparably with ``candidate``; None when there is none.

    Registry errors other than "does not exist" raise ``PromotionError``.
    """
    name = candidate.model_name
    version = champion_version(client, name)
    if version is None:
        return None
    with registry_step(name, f"read champion v{version}'s tags"):
        tags = dict(client.get_model_version(name, version).tags or {})
    recorded = tags.get(metric_tag(candidate.primary_metric))
    if tags.get("eval_hash") == candidate.eval_hash and recorded not in (None, "none"):
        return Champion(version=version, metric=float(str(recorded)), basis="recorded on the same eval set")
    if rescore is None:
        return Champion(version=version, metric=None, basis="measured on another eval set; no way to re-score it")
    with registry_step(name, f"re-score champion v{version}"):
        scored = rescore(version)
    if isinstance(scored, NotComparable):
        return Champion(version=version, metric=None, basis=scored.reason)
    return Champion(version=version, metric=float(scored), basis="re-scored on the candidate's eval set")


def promote_locked(client: Any, candidate: Candidate, rescore: Rescore | None = None) -> Decision:
    """With the lock held: re-read the champion, decide, record the evidence as tags, then move the alias."""
    name = candidate.model_name
    champion = read_champion(client, candidate, rescore)
    if champion is not None and champion.version == candidate.version:
        return Decision(
            outcome=Outcome.ALREADY_CHAMPION, decision="already champion", champion_version=None, champion_metric=None
        )
    outcome, message = decide(candidate.metric, champion, candidate.margin)
    champion_metric = None if champion is None else champion.metric
    evidence = {
        PREVIOUS_CHAMPION_TAG: "none" if champion is None else champion.version,
        f"champion.{candidate.primary_metric}": "none" if champion_metric is None else f"{champion_metric:.6f}",
        "promotion.margin": f"{candidate.margin:g}",
        "promotion.decision": message,
        "promotion.outcome": outcome.value,
    }
    with registry_step(name, f"tag v{candidate.version} with the promotion evidence"):
        for key, value in evidence.items():
            client.set_model_version_tag(name, candidate.version, key, value)
    if outcome.promoted:  # last step: everything before it can fail without having moved the champion
        with registry_step(name, f"move alias {CHAMPION} to v{candidate.version}"):
            client.set_registered_model_alias(name, CHAMPION, candidate.version)
    logger.info("promotion of %s v%s: %s", name, candidate.version, message)
    return Decision(
        outcome=outcome,
        decision=message,
        champion_version=None if champion is None else champion.version,
        champion_metric=champion_metric,
    )


def promote_version(candidate: Candidate, rescore: Rescore | None = None) -> Decision:
    """Take the model's promotion lock and run the gate for ``candidate`` (safe when runs finish together)."""
    import mlflow

    with promotion_lock(candidate.model_name):
        return promote_locked(mlflow.MlflowClient(), candidate, rescore)
