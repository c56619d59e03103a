"""Publishing one model version, for every head: log the served pyfunc, register it, tag it, gate promotion.

``publish_version`` is the one core both heads go through. The new version gets alias
``challenger``; alias ``champion`` moves to it only when there is no champion, or when it beats the
champion on the same eval set by more than the margin (``tasks.publishing.promotion``). Everything
that touches the registry happens inside the model's promotion lock.

Atomic, in this order (why: a reader must never see a version without its evidence, and the
champion must never move unless the whole publish succeeds):

1. Before the lock: a version already carrying the idempotency key is returned; else the pyfunc is
   logged to the run (artifacts are copied outside the lock, which only guards the registry).
2. In the lock: versions a dead publish left ``registration=pending`` are deleted (putting
   ``champion`` back where their own ``champion.version`` tag says it was), and the key is checked
   again, so two runs with one key register one version.
3. The version is created with ALL its evidence tags in the same registry call
   (``create_model_version(..., tags=...)``, one database transaction in MLflow's SQL store), plus
   ``registration=pending`` and a token unique to this call (``registration_attempt``). There is
   no moment at which it exists without its tags, and ``version_with_key`` ignores it while pending.
4. Alias ``challenger``, the promotion evidence, then (only if promoted) alias ``champion``.
   The aliases are read before step 3, inside the lock, so a rollback can put them back.
5. Last: ``registration=complete``.

If any step fails, the versions carrying this call's token are found by tag (also when the create
call failed after the store had created the version) and deleted, after ``champion`` and
``challenger`` are put back on the versions they named before, if they had moved; the
``PromotionError`` names the step. If even that undo fails (the store is down), or the process
dies, the version stays ``pending``: invisible to idempotency and deleted by the next publish of
the model.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune_flows.plugins import PromotionError
from finetune_flows.tasks.core.secrets import redact
from finetune_flows.tasks.publishing.promotion import (
    Candidate,
    Outcome,
    Rescore,
    metric_tag,
    promote_locked,
    promotion_lock,
)
from finetune_flows.tasks.publishing.registry import (
    ATTEMPT_TAG,
    CHALLENGER,
    CHAMPION,
    COMPLETE,
    KEY_TAG,
    PENDING,
    PREVIOUS_CHAMPION_TAG,
    STATE_TAG,
    aliases_of,
    create_version,
    registry_step,
    sweep_pending,
    undo_attempt,
    version_with_key,
)
from finetune_flows.tasks.serving.text_inputs import SERVED_MODEL_CONFIG

logger = logging.getLogger(__name__)

LOGGED_NAME = "model"  # the pyfunc's name inside the run


class ServedModel(BaseModel):
    """What is served: an MLflow models-from-code pyfunc, its artifacts and a real input example."""

    model_config = ConfigDict(frozen=True)

    python_model: str = Field(description="Path of the models-from-code file that calls mlflow.models.set_model.")
    artifacts: dict[str, str] = Field(description="Artifact name -> local file or folder shipped with the model.")
    code_paths: list[str] = Field(default_factory=list, description="Local code folders shipped with the model.")
    pip_requirements: list[str] = Field(default_factory=list, description="The served model's pip requirements.")
    input_example: list[str] | dict[str, list[str]] = Field(
        description="The model's real input, from the run's eval data: texts (classifier) or "
        "columns of texts such as {'query': [...], 'item': [...]} (pair scorer). The signature is inferred from it."
    )

    @model_validator(mode="after")
    def _example_is_usable(self) -> ServedModel:
        columns = self.input_example if isinstance(self.input_example, dict) else {"texts": self.input_example}
        lengths = {len(values) for values in columns.values()}
        if not columns or 0 in lengths or len(lengths) > 1:
            raise ValueError(f"input_example needs one or more rows, the same number in every column: {lengths}")
        return self

    def example(self) -> list[str] | pd.DataFrame:
        """The input example as the model receives it (columns become a frame, not arrays of strings)."""
        return pd.DataFrame(self.input_example) if isinstance(self.input_example, dict) else list(self.input_example)


class RegisterResult(BaseModel):
    """The registered version and the promotion decision."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    promoted: bool
    outcome: Outcome
    decision: str
    challenger_metric: float
    champion_version: str | None
    champion_metric: float | None
    run_id: str
    model_uri: str
    reused: bool = False
    """True when an earlier run registered this version under the same idempotency key."""


def log_served_model(run_id: str, served: ServedModel) -> Any:
    """Log the pyfunc to run ``run_id`` (signature inferred by running it on its input example); its ModelInfo."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=LOGGED_NAME,
            python_model=served.python_model,
            artifacts=served.artifacts,
            code_paths=served.code_paths or None,
            pip_requirements=served.pip_requirements or None,
            input_example=served.example(),
            model_config=SERVED_MODEL_CONFIG,  # onnx_threads, overridable by load_model(..., model_config=...)
        )
    if info.signature is None or info.signature.outputs is None:
        raise PromotionError(
            f"the served model {served.python_model} did not predict on its input example, so MLflow inferred "
            "no output signature; load it with mlflow.pyfunc.load_model and predict on the example to see why"
        )
    return info


def publish_version(
    run_id: str,
    model_name: str,
    served: ServedModel,
    *,
    metric: float,
    primary_metric: str,
    eval_hash: str,
    margin: float = 0.0,
    tags: Mapping[str, str] | None = None,
    rescore: Rescore | None = None,
    idempotency_key: str | None = None,
) -> RegisterResult:
    """Log ``served`` to run ``run_id``, register it as a version of ``model_name`` with ``tags`` and the
    evidence, and run the promotion gate, atomically (see the module docstring). A version already
    carrying ``idempotency_key`` is returned (``reused=True``) instead of a new one.

    ``metric`` is the candidate's ``primary_metric`` on the eval set ``eval_hash`` names; ``rescore``
    measures a champion that was measured on another eval set. The MLflow tracking URI must be set.
    """
    import mlflow

    client = mlflow.MlflowClient()
    if idempotency_key and (found := version_with_key(client, model_name, idempotency_key)) is not None:
        return reused_result(client, model_name, found, primary_metric, idempotency_key)
    info = log_served_model(run_id, served)
    attempt = uuid.uuid4().hex
    evidence = {
        **{key: str(value) for key, value in (tags or {}).items()},
        **({KEY_TAG: idempotency_key} if idempotency_key else {}),
        "eval_hash": eval_hash,
        "primary_metric": primary_metric,
        metric_tag(primary_metric): f"{metric:.6f}",
        STATE_TAG: PENDING,
        ATTEMPT_TAG: attempt,
    }
    with promotion_lock(model_name):
        sweep_pending(client, model_name)
        if idempotency_key and (found := version_with_key(client, model_name, idempotency_key)) is not None:
            logger.info("publish: a run with key %r registered while this one logged its model", idempotency_key)
            return reused_result(client, model_name, found, primary_metric, idempotency_key)
        before = aliases_of(client, model_name)  # raises on registry errors before anything is created
        try:
            with registry_step(model_name, "create the version with its tags"):
                version = create_version(client, model_name, info.model_uri, run_id, info.model_id, evidence)
            with registry_step(model_name, f"move alias {CHALLENGER} to v{version}"):
                client.set_registered_model_alias(model_name, CHALLENGER, version)
            candidate = Candidate(
                model_name=model_name,
                version=version,
                primary_metric=primary_metric,
                metric=metric,
                eval_hash=eval_hash,
                margin=margin,
            )
            decision = promote_locked(client, candidate, rescore)
            with registry_step(model_name, f"tag v{version} {STATE_TAG}={COMPLETE}"):
                client.set_model_version_tag(model_name, version, STATE_TAG, COMPLETE)
        except Exception as exc:
            raise rolled_back(client, model_name, attempt, before, exc) from exc
    result = RegisterResult(
        model_name=model_name,
        version=version,
        aliases=sorted({CHALLENGER} | ({CHAMPION} if decision.promoted else set())),
        promoted=decision.promoted,
        outcome=decision.outcome,
        decision=decision.decision,
        challenger_metric=metric,
        champion_version=decision.champion_version,
        champion_metric=decision.champion_metric,
        run_id=run_id,
        model_uri=f"models:/{model_name}/{version}",
    )
    logger.info("publish: %s version %s, aliases %s; %s", model_name, version, result.aliases, result.decision)
    return result


def rolled_back(
    client: Any, model_name: str, attempt: str, aliases_before: dict[str, str], cause: Exception
) -> PromotionError:
    """Undo a failed publish (see ``undo_attempt``); the error to raise, saying what was undone."""
    try:
        deleted = undo_attempt(client, model_name, attempt, aliases_before)
    except Exception as undo:
        return PromotionError(
            f"publishing {model_name} failed: {cause}; undoing it failed too ({type(undo).__name__}: {undo}): "
            f"a version tagged {STATE_TAG}={PENDING} may remain; the next publish of {model_name} deletes it"
        )
    return PromotionError(
        f"publishing {model_name} failed and was rolled back (deleted version(s): {', '.join(deleted) or 'none'}; "
        f"champion stays {aliases_before.get(CHAMPION, 'unset')}): {cause}"
    )


def reused_result(client: Any, model_name: str, existing: Any, primary_metric: str, key: str) -> RegisterResult:
    """The result for a version an earlier run registered under the same idempotency key."""
    tags = dict(existing.tags or {})
    version = str(existing.version)
    champion = tags.get(PREVIOUS_CHAMPION_TAG, "none")
    champion_value = tags.get(f"champion.{primary_metric}", "none")
    with registry_step(model_name, f"read v{version}'s aliases"):
        aliases = sorted(client.get_model_version(model_name, version).aliases)
    logger.info("publish: %s v%s exists for key %r; not registering again", model_name, version, key)
    return RegisterResult(
        model_name=model_name,
        version=version,
        aliases=aliases,
        promoted=False,
        outcome=Outcome.REUSED,
        decision=f"reused: version {version} was registered for this key already ({tags.get('promotion.decision')})",
        challenger_metric=float(tags.get(metric_tag(primary_metric), "nan")),
        champion_version=None if champion == "none" else champion,
        champion_metric=None if champion_value == "none" else float(champion_value),
        run_id=str(existing.run_id),
        model_uri=f"models:/{model_name}/{version}",
        reused=True,
    )


def summary_markdown(result: RegisterResult, primary_metric: str, tracking_uri: str) -> str:
    """The registration artifact's Markdown: version, aliases, the two metrics, the decision and a link."""
    champion = "none" if result.champion_metric is None else f"{result.champion_metric:.4f}"
    return (
        f"### {result.model_name} version {result.version}\n\n"
        f"aliases: {', '.join(result.aliases) or 'none'}\n\n"
        f"| | version | {primary_metric} |\n|---|---|---|\n"
        f"| challenger | {result.version} | {result.challenger_metric:.4f} |\n"
        f"| champion before | {result.champion_version or 'none'} | {champion} |\n\n"
        f"**decision ({result.outcome.value}): {result.decision}**\n\n"
        f"MLflow: {version_link(tracking_uri, result.model_name, result.version)} "
        f"(`{result.model_uri}`, run `{result.run_id}`)"
    )


def version_link(tracking_uri: str, model_name: str, version: str) -> str:
    """A Markdown link to the version's page in the MLflow UI (a local store: how to open it); no credentials."""
    page = f"#/models/{quote(model_name)}/versions/{version}"
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(redact(tracking_uri))
        base = urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        return f"[{model_name} v{version}]({base}/{page})"
    return (
        f"[{model_name} v{version}](http://127.0.0.1:5000/{page}) once "
        f"`mlflow ui --backend-store-uri {redact(tracking_uri)}` runs"
    )
