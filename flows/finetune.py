"""Flow ``finetune``: labelled text -> fine-tuned, evaluated, ONNX-exported, registered model.

Deployments reach it by entrypoint ``flows/finetune.py:finetune``.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from tasks.config import FinetuneConfig
from tasks.evaluation import evaluate_model
from tasks.export import export_model, export_topic_encoder
from tasks.ingestion import ingest_data
from tasks.model_source import fetch_model
from tasks.registration import register_version
from tasks.tokenization import tokenize_data
from tasks.tracking import start_run
from tasks.training import fine_tune

HEADLINE = ("accuracy", "macro_f1", "ece")


class FinetuneSummary(BaseModel):
    """What a finished run produced."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    decision: str
    metrics: dict[str, float]
    onnx_path: str
    run_id: str
    reused_ingest: bool
    reused_tokens: bool
    train_seconds: float


@flow(name="finetune", log_prints=False)
def finetune(config: FinetuneConfig = FinetuneConfig()) -> FinetuneSummary:  # noqa: B008
    """Fine-tune a text model for a scenario, evaluate it, export it to ONNX and register it."""
    run = start_run(config)
    data = ingest_data(config)
    base_model = fetch_model(config, run)
    tokens = tokenize_data(data, base_model, config)
    trained = fine_tune(tokens, data, base_model, config, run)
    evaluation = evaluate_model(trained.model_dir, data, config, run)
    exported = export_model(trained.model_dir, data, tokens, config, run)
    topics = export_topic_encoder(data, config, run)
    registered = register_version(trained.model_dir, data, tokens, evaluation, exported, config, run, topics)
    return FinetuneSummary(
        model_name=registered.model_name,
        version=registered.version,
        aliases=registered.aliases,
        decision=registered.decision,
        metrics={
            **{k: v for k, v in evaluation.metrics.items() if k in HEADLINE},
            **{f"test_{k}": v for k, v in (evaluation.test_metrics or {}).items() if k in HEADLINE},
        },
        onnx_path=exported.onnx_path,
        run_id=registered.run_id,
        reused_ingest=data.cached,
        reused_tokens=tokens.cached,
        train_seconds=trained.train_seconds,
    )
