"""Reading and writing the MLflow model registry for publishing: typed errors, keyed and pending versions.

Only "it does not exist" may mean "none": a registered model that was never created, or a model
without a ``champion`` alias, has no champion. Every other registry error (a locked database, a
lost connection, a refused request) raises ``PromotionError`` naming the model and the step, so an
outage is never read as "no champion yet" and promoted over.

MLflow marks "does not exist" with error code ``RESOURCE_DOES_NOT_EXIST``, but a missing *alias*
is reported as ``INVALID_PARAMETER_VALUE`` by the SQL store, a code that also covers real
mistakes. So the champion is read from the registered model's alias map
(``get_registered_model(name).aliases``): a missing model is ``RESOURCE_DOES_NOT_EXIST``, a
missing alias is a missing key, and nothing depends on an error's wording.

Versions being published carry tag ``registration=pending`` from the call that creates them until
the publish finished (see ``tasks.publishing.registration``); a version still pending was left by
a process that died, and the next publish of the model deletes it (``sweep_pending``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finetune_flows.plugins import PromotionError

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
KEY_TAG = "idempotency_key"
STATE_TAG, PENDING, COMPLETE = "registration", "pending", "complete"
ATTEMPT_TAG = "registration_attempt"
"""A token unique to one publish call: finds the version it created even when the create call itself failed."""
PREVIOUS_CHAMPION_TAG = "champion.version"


def does_not_exist(exc: BaseException) -> bool:
    """True when ``exc`` is MLflow saying the model (or version) does not exist, and nothing else."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return isinstance(exc, MlflowException) and exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


@contextmanager
def registry_step(model_name: str, step: str) -> Iterator[None]:
    """Raise any error inside as ``PromotionError`` naming the model and the step (ours pass through)."""
    try:
        yield
    except PromotionError:
        raise
    except Exception as exc:
        raise PromotionError(
            f"model registry step '{step}' failed for model {model_name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def aliases_of(client: Any, model_name: str) -> dict[str, str]:
    """Alias -> version of ``model_name``; empty when the model does not exist. Other errors raise PromotionError."""
    try:
        aliases = client.get_registered_model(model_name).aliases
    except Exception as exc:
        if does_not_exist(exc):
            return {}
        raise PromotionError(
            f"model registry step 'read the champion' failed for model {model_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return {str(alias): str(version) for alias, version in (aliases or {}).items()}


def champion_version(client: Any, model_name: str) -> str | None:
    """The version alias ``champion`` points at; None when the model or the alias does not exist."""
    return aliases_of(client, model_name).get(CHAMPION)


def model_versions(client: Any, model_name: str, condition: str = "") -> list[Any]:
    """Every version of ``model_name`` (matching the MLflow filter ``condition``), all pages."""
    filter_string = f"name='{model_name}'" + (f" and {condition}" if condition else "")
    found: list[Any] = []
    token: str | None = None
    with registry_step(model_name, "search versions"):
        while True:
            try:
                page = client.search_model_versions(filter_string, page_token=token)
            except Exception as exc:
                if does_not_exist(exc):
                    return []
                raise
            found.extend(page)
            token = page.token
            if not token:
                return found


def version_with_key(client: Any, model_name: str, key: str) -> Any | None:
    """The earliest complete version tagged ``idempotency_key=key``, or None (call with the lock held to be sure).

    A pending version does not count: its publish may still fail and be rolled back.
    """
    matches = [
        v
        for v in model_versions(client, model_name)
        if (v.tags or {}).get(KEY_TAG) == key and (v.tags or {}).get(STATE_TAG) != PENDING
    ]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def sweep_pending(client: Any, model_name: str) -> list[str]:
    """Delete the versions a dead publish left pending (with the promotion lock held); the versions deleted.

    If one of them already holds ``champion``, the alias goes back to the version its
    ``champion.version`` tag names first (that publish read it inside the lock).
    """
    pending = model_versions(client, model_name, f"tags.{STATE_TAG}='{PENDING}'")
    if not pending:
        return []
    champion = champion_version(client, model_name)
    deleted = []
    for version in sorted(pending, key=lambda v: int(v.version)):
        number = str(version.version)
        previous = (version.tags or {}).get(PREVIOUS_CHAMPION_TAG, "none")
        with registry_step(model_name, f"delete version {number} left pending"):
            if champion == number and previous != "none":
                client.set_registered_model_alias(model_name, CHAMPION, previous)
            client.delete_model_version(model_name, number)
        deleted.append(number)
    logger.warning("publish: deleted version(s) %s of %s that a failed publish left pending", deleted, model_name)
    return deleted


def create_version(
    client: Any, model_name: str, source: str, run_id: str, model_id: str | None, tags: dict[str, str]
) -> str:
    """Create the registered model when missing, then a version carrying ``tags`` from its first moment."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    created = client.create_model_version(model_name, source, run_id, tags=tags, model_id=model_id)
    return str(created.version)


def undo_attempt(client: Any, model_name: str, attempt: str, aliases_before: dict[str, str]) -> list[str]:
    """Delete the versions one publish call created; first put back the aliases that moved to one of them."""
    created = sorted(str(v.version) for v in model_versions(client, model_name, f"tags.{ATTEMPT_TAG}='{attempt}'"))
    for alias, version in aliases_of(client, model_name).items():
        if version in created and alias in aliases_before:
            client.set_registered_model_alias(model_name, alias, aliases_before[alias])
    for version in created:
        client.delete_model_version(model_name, version)
    return created
