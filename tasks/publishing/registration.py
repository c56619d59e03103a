"""Stage 6, register: an MLflow run with params, metrics, plots and data hashes, and a registered
model version (a raw-text pyfunc running the parity-checked ONNX graph).

The new version gets alias ``challenger``. Alias ``champion`` moves to it only when there is no
champion, or when it beats the champion on the same eval set by more than the margin. All of it
happens inside the model's promotion lock (``tasks.publishing.promotion``): the champion's metric is re-read
there (from its tags when it was measured on the same eval set, else re-scored with its own
pyfunc), so both numbers come from the same texts and two runs finishing together cannot both
promote. A version already tagged with the run's idempotency key is returned instead of a new
one. The comparison is recorded as version tags. If tagging or aliasing fails, the new version
is deleted again, so a failed registration leaves the registry as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import SCENARIOS, PromotionError
from finetune_flows.tasks.classification.evaluation import EvalResult, classification_metrics
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.ingestion import IngestResult
from finetune_flows.tasks.core.model_source import HF_SUBDIR
from finetune_flows.tasks.core.tokenization import TokenizeResult
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.export.model_export import ExportResult, TopicEncoderResult
from finetune_flows.tasks.publishing.promotion import (
    CHALLENGER,
    CHAMPION,
    KEY_TAG,
    Candidate,
    Decision,
    metric_tag,
    promote_locked,
    promotion_lock,
    version_with_key,
)
from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT, TOPIC_ARTIFACT

logger = logging.getLogger(__name__)

SERVING_DIR = Path(__file__).resolve().parents[1] / "serving"

HEADLINE = ("accuracy", "macro_f1")  # metrics copied to version tags, for the registry's list view


class RegisterResult(BaseModel):
    """The registered version and the promotion decision."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    promoted: bool
    decision: str
    challenger_metric: float
    champion_version: str | None
    champion_metric: float | None
    run_id: str
    model_uri: str
    reused: bool = False
    """True when an earlier run registered this version under the same idempotency key."""


def champion_metric_on(
    model_name: str, version: str, eval_dataset: Path, labels: list[str], primary_metric: str
) -> tuple[float | None, str]:
    """(metric, note) of champion ``version`` re-scored with its own pyfunc on this eval set."""
    import mlflow

    champion = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    frame = pd.read_parquet(eval_dataset / "eval.parquet")
    predicted = champion.predict(pd.DataFrame({"text": frame["text"]}))
    champion_labels = [c.removeprefix("prob_") for c in predicted.columns if c.startswith("prob_")]
    if champion_labels != labels:
        return None, f"champion labels {champion_labels} differ from {labels}; not comparable"
    index = {label: i for i, label in enumerate(labels)}
    pred_ids = predicted["label"].map(index).to_numpy()
    probs = predicted[[f"prob_{label}" for label in labels]].to_numpy()
    metrics = classification_metrics(frame["label_id"].to_numpy(), pred_ids, probs, labels)
    return float(metrics[primary_metric]), "re-scored on the same eval set"


def reused_version(client: Any, model_name: str, existing: Any, primary_metric: str, key: str) -> RegisterResult:
    """The result for a version an earlier run registered under the same idempotency key."""
    tags = dict(existing.tags or {})
    version = str(existing.version)
    champion = tags.get("champion.version", "none")
    champion_value = tags.get(f"champion.{primary_metric}", "none")
    logger.info("register: %s v%s exists for key %r; not registering again", model_name, version, key)
    return RegisterResult(
        model_name=model_name,
        version=version,
        aliases=sorted(client.get_model_version(model_name, version).aliases),
        promoted=False,
        decision=f"reused: version {version} was registered for this key already ({tags.get('promotion.decision')})",
        challenger_metric=float(tags.get(metric_tag(primary_metric), "nan")),
        champion_version=None if champion == "none" else champion,
        champion_metric=None if champion_value == "none" else float(champion_value),
        run_id=str(existing.run_id),
        model_uri=f"models:/{model_name}/{version}",
        reused=True,
    )


def register_model(
    run_id: str,
    model_name: str,
    onnx_path: Path,
    model_dir: Path,
    eval_dataset: Path,
    labels: list[str],
    primary_metric: str,
    challenger_metric: float,
    margin: float,
    tags: dict[str, str],
    topic_encoder: Path | None = None,
    idempotency_key: str | None = None,
) -> RegisterResult:
    """Log the pyfunc to ``run_id``, register it, tag the evidence and move aliases, all inside the model's
    promotion lock; a version already carrying ``idempotency_key`` is returned instead of a new one."""
    with promotion_lock(model_name):
        return _register_locked(
            run_id, model_name, onnx_path, model_dir, eval_dataset, labels, primary_metric,
            challenger_metric, margin, tags, topic_encoder, idempotency_key,
        )  # fmt: skip


def _register_locked(
    run_id: str,
    model_name: str,
    onnx_path: Path,
    model_dir: Path,
    eval_dataset: Path,
    labels: list[str],
    primary_metric: str,
    challenger_metric: float,
    margin: float,
    tags: dict[str, str],
    topic_encoder: Path | None,
    idempotency_key: str | None,
) -> RegisterResult:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    client = mlflow.MlflowClient()
    if idempotency_key and (existing := version_with_key(client, model_name, idempotency_key)) is not None:
        return reused_version(client, model_name, existing, primary_metric, idempotency_key)

    example = ["a gorgeous, witty film"]
    out_example = pd.DataFrame({"label": [labels[0]], "score": [1.0], **{f"prob_{x}": [0.5] for x in labels}})
    if topic_encoder:
        out_example["topic"] = ["other"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_DIR / "classifier_model.py"),
            artifacts={
                ONNX_ARTIFACT: str(onnx_path),
                TOKENIZER_ARTIFACT: str(model_dir / "tokenizer.json"),
                HF_SUBDIR: str(model_dir),
                **({TOPIC_ARTIFACT: str(topic_encoder)} if topic_encoder else {}),
            },
            signature=infer_signature(example, out_example),
            input_example=example,
            code_paths=[str(SERVING_DIR.parent)],
            pip_requirements=["onnxruntime", "tokenizers", "pandas", "numpy", "mlflow"],
        )
    try:
        previous_champion: str | None = str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        previous_champion = None
    registered = mlflow.register_model(info.model_uri, model_name)
    version = str(registered.version)
    candidate = Candidate(
        model_name=model_name,
        version=version,
        primary_metric=primary_metric,
        metric=challenger_metric,
        eval_hash=tags.get("eval_hash", ""),
        margin=margin,
    )
    evidence: dict[str, Any] = {
        **tags,
        **({KEY_TAG: idempotency_key} if idempotency_key else {}),
        "primary_metric": primary_metric,
        metric_tag(primary_metric): f"{challenger_metric:.6f}",
    }
    decision: Decision | None = None
    try:
        for key, value in evidence.items():
            client.set_model_version_tag(model_name, version, key, str(value))
        client.set_registered_model_alias(model_name, CHALLENGER, version)

        def rescore(champion: str) -> tuple[float | None, str]:
            return champion_metric_on(model_name, champion, eval_dataset, labels, primary_metric)

        decision = promote_locked(client, candidate, rescore)
        result = RegisterResult(
            model_name=model_name,
            version=version,
            aliases=sorted(client.get_model_version(model_name, version).aliases),
            promoted=decision.promoted,
            decision=decision.decision,
            challenger_metric=challenger_metric,
            champion_version=decision.champion_version,
            champion_metric=decision.champion_metric,
            run_id=run_id,
            model_uri=f"models:/{model_name}/{version}",
        )
    except Exception as exc:
        # Deleting the version drops its aliases too; the champion alias never left the old version
        # unless this very step moved it, in which case it is put back.
        client.delete_model_version(model_name, version)
        if previous_champion is not None and decision is not None and decision.promoted:
            client.set_registered_model_alias(model_name, CHAMPION, previous_champion)
        raise PromotionError(f"registering {model_name} v{version} failed and was rolled back: {exc}") from exc
    logger.info("register: %s version %s, aliases %s; %s", model_name, version, result.aliases, decision.decision)
    return result


@task(name="register")
def register_version(
    model_dir: str,
    data: IngestResult,
    tokens: TokenizeResult,
    evaluation: EvalResult,
    exported: ExportResult,
    config: FinetuneConfig,
    run: RunInfo,
    topics: TopicEncoderResult | None = None,
) -> RegisterResult:
    """Register the parity-checked model and move the aliases the promotion gate allows."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    tags = {
        "scenario": config.scenario,
        "head": config.head_name,
        "data_hash": data.data_hash,
        "eval_hash": data.eval_hash,
        "tokenizer_hash": tokens.tokenizer_hash,
        "onnx_max_abs_logit_diff": f"{exported.max_abs_diff:.3g}",
        "run_dir": run.run_dir,
        "model_source": config.model.source,
        **{f"eval.{k}": f"{evaluation.metrics[k]:.4f}" for k in HEADLINE},
        **{f"test.{k}": f"{(evaluation.test_metrics or {})[k]:.4f}" for k in HEADLINE if evaluation.test_metrics},
    }
    with mlflow.start_run(run_id=run.run_id):
        mlflow.set_tags({k: v for k, v in tags.items() if k != "run_dir"})
    result = register_model(
        run.run_id,
        config.model_name,
        Path(exported.onnx_path),
        Path(model_dir),
        Path(data.dataset_dir),
        data.labels,
        SCENARIOS.get(config.scenario).primary_metric,
        evaluation.primary,
        config.registration.promotion_margin,
        tags,
        topic_encoder=Path(topics.folder) if topics else None,
        idempotency_key=config.registration.idempotency_key,
    )
    champion = "none" if result.champion_metric is None else f"{result.champion_metric:.4f}"
    create_markdown_artifact(
        key=f"{config.scenario}-registration",
        description="Registered model version and promotion decision",
        markdown=(
            f"### {result.model_name} version {result.version}\n\n"
            f"aliases: {', '.join(result.aliases) or 'none'}\n\n"
            f"| | version | {SCENARIOS.get(config.scenario).primary_metric} |\n|---|---|---|\n"
            f"| challenger | {result.version} | {result.challenger_metric:.4f} |\n"
            f"| champion before | {result.champion_version or 'none'} | {champion} |\n\n"
            f"**decision: {result.decision}**\n\n"
            f"MLflow: {version_link(run.tracking_uri, result.model_name, result.version)} "
            f"(`{result.model_uri}`, run `{result.run_id}`)"
        ),
    )
    return result


def version_link(tracking_uri: str, model_name: str, version: str) -> str:
    """A Markdown link to the version's page in the MLflow UI (a local store: how to open it)."""
    page = f"#/models/{quote(model_name)}/versions/{version}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"[{model_name} v{version}]({tracking_uri.rstrip('/')}/{page})"
    return (
        f"[{model_name} v{version}](http://127.0.0.1:5000/{page}) once "
        f"`mlflow ui --backend-store-uri {tracking_uri}` runs"
    )
