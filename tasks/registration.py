"""Stage 6, register: an MLflow run with params, metrics, plots and data hashes, and a registered
model version (a raw-text pyfunc running the parity-checked ONNX graph).

The new version gets alias ``challenger``. Alias ``champion`` moves to it only when there is no
champion, or when it beats the champion on the same eval set by more than the margin; the
champion is re-scored here with its own pyfunc, so both numbers come from the same texts. The
comparison is recorded as version tags. If tagging or aliasing fails, the new version is
deleted again, so a failed registration leaves the registry as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from plugins import SCENARIOS, PromotionError
from tasks.config import FinetuneConfig
from tasks.evaluation import EvalResult, classification_metrics
from tasks.export import ExportResult, TopicEncoderResult
from tasks.ingestion import IngestResult
from tasks.model_source import HF_SUBDIR
from tasks.serving import ONNX_ARTIFACT, TOKENIZER_ARTIFACT, TOPIC_ARTIFACT
from tasks.tokenization import TokenizeResult
from tasks.tracking import RunInfo

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
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


def champion_metric_on(
    model_name: str, eval_dataset: Path, labels: list[str], primary_metric: str
) -> tuple[str | None, float | None, str]:
    """(version, metric, note) of the current champion scored on this eval set; (None, None, note) if none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, None, "no champion yet"
    champion = mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")
    frame = pd.read_parquet(eval_dataset / "eval.parquet")
    predicted = champion.predict(pd.DataFrame({"text": frame["text"]}))
    champion_labels = [c.removeprefix("prob_") for c in predicted.columns if c.startswith("prob_")]
    if champion_labels != labels:
        return (
            str(version.version),
            None,
            f"champion labels {champion_labels} differ from {labels}; not comparable",
        )
    index = {label: i for i, label in enumerate(labels)}
    pred_ids = predicted["label"].map(index).to_numpy()
    probs = predicted[[f"prob_{label}" for label in labels]].to_numpy()
    metrics = classification_metrics(frame["label_id"].to_numpy(), pred_ids, probs, labels)
    return str(version.version), float(metrics[primary_metric]), "scored on the same eval set"


def decide(challenger: float, champion: float | None, margin: float, note: str) -> tuple[bool, str]:
    """Promote when there is no comparable champion metric, or the challenger beats it by more than ``margin``."""
    if champion is None:
        if "not comparable" in note:
            return False, f"kept champion: {note}"
        return True, "promoted: no champion yet"
    if challenger > champion + margin:
        return True, f"promoted: {challenger:.4f} > champion {champion:.4f} + margin {margin:g}"
    return False, f"kept champion: {challenger:.4f} <= champion {champion:.4f} + margin {margin:g}"


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
) -> RegisterResult:
    """Log the pyfunc to ``run_id``, register it, tag the evidence and move aliases."""
    import mlflow
    from mlflow.models import infer_signature

    champion_version, champion_value, note = champion_metric_on(model_name, eval_dataset, labels, primary_metric)
    promote, decision = decide(challenger_metric, champion_value, margin, note)

    example = ["a gorgeous, witty film"]
    out_example = pd.DataFrame({"label": [labels[0]], "score": [1.0], **{f"prob_{x}": [0.5] for x in labels}})
    if topic_encoder:
        out_example["topic"] = ["other"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={
                ONNX_ARTIFACT: str(onnx_path),
                TOKENIZER_ARTIFACT: str(model_dir / "tokenizer.json"),
                HF_SUBDIR: str(model_dir),
                **({TOPIC_ARTIFACT: str(topic_encoder)} if topic_encoder else {}),
            },
            signature=infer_signature(example, out_example),
            input_example=example,
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=["onnxruntime", "tokenizers", "pandas", "numpy", "mlflow"],
        )
    client = mlflow.MlflowClient()
    registered = mlflow.register_model(info.model_uri, model_name)
    version = str(registered.version)
    evidence: dict[str, Any] = {
        **tags,
        "primary_metric": primary_metric,
        f"challenger.{primary_metric}": f"{challenger_metric:.6f}",
        "champion.version": champion_version or "none",
        f"champion.{primary_metric}": "none" if champion_value is None else f"{champion_value:.6f}",
        "promotion.margin": f"{margin:g}",
        "promotion.decision": decision,
    }
    moved_champion = False
    try:
        for key, value in evidence.items():
            client.set_model_version_tag(model_name, version, key, str(value))
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        if promote:
            client.set_registered_model_alias(model_name, CHAMPION, version)
            moved_champion = True
        result = RegisterResult(
            model_name=model_name,
            version=version,
            aliases=sorted(client.get_model_version(model_name, version).aliases),
            promoted=promote,
            decision=decision,
            challenger_metric=challenger_metric,
            champion_version=champion_version,
            champion_metric=champion_value,
            run_id=run_id,
            model_uri=f"models:/{model_name}/{version}",
        )
    except Exception as exc:
        # Deleting the version drops its aliases too; the champion alias never left the old version
        # unless this very step moved it, in which case it is put back.
        client.delete_model_version(model_name, version)
        if champion_version is not None and moved_champion:
            client.set_registered_model_alias(model_name, CHAMPION, champion_version)
        raise PromotionError(f"registering {model_name} v{version} failed and was rolled back: {exc}") from exc
    logger.info("register: %s version %s, aliases %s; %s", model_name, version, result.aliases, decision)
    return result


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
    )
    create_markdown_artifact(
        key=f"{config.scenario}-registration",
        description="Registered model version and promotion decision",
        markdown=(
            f"### {result.model_name} version {result.version}\n\n"
            f"aliases: {', '.join(result.aliases) or 'none'}\n\n"
            f"decision: {result.decision}\n\n"
            f"MLflow: `{result.model_uri}` (run `{result.run_id}`), tracking URI `{run.tracking_uri}`"
        ),
    )
    return result
