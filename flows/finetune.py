"""Flow ``finetune``: labelled text -> fine-tuned, evaluated, ONNX-exported, registered model.

Deployments reach it by entrypoint ``flows/finetune.py:finetune``. The training stage is flow
``train`` (flows/train.py): a subflow here, or a run of deployment ``training.train_on`` on
another work pool. A failed run's state message names the stage: "stage evaluate failed: ...".
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from finetune_flows.flows.train import fine_tune, hand_off_training, run_training, stage_failed, train_stage
from finetune_flows.tasks.classification.evaluation import evaluate_model
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.ingestion import ingest_data
from finetune_flows.tasks.core.model_source import fetch_model
from finetune_flows.tasks.core.tokenization import tokenize_data
from finetune_flows.tasks.core.tracking import start_run
from finetune_flows.tasks.core.training import fine_tune_request
from finetune_flows.tasks.export.model_export import export_model, export_topic_encoder
from finetune_flows.tasks.publishing.registration import register_version

HEADLINE = ("accuracy", "macro_f1", "ece")
STAGES = (
    start_run, ingest_data, fetch_model, tokenize_data, train_stage, fine_tune, hand_off_training,
    evaluate_model, export_model, export_topic_encoder, register_version,
)  # fmt: skip


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
    reused_version: bool = False
    """True when the version was registered by an earlier run with the same idempotency key."""


@flow(name="finetune", log_prints=False)
def finetune(config: FinetuneConfig = FinetuneConfig()) -> FinetuneSummary:  # noqa: B008
    """Fine-tune a text model for a scenario, evaluate it, export it to ONNX and register it."""
    try:
        return run_pipeline(config)
    except Exception as exc:
        return stage_failed(exc, STAGES)


def run_pipeline(config: FinetuneConfig) -> FinetuneSummary:
    """The stages in order; each passes paths and small models to the next."""
    run = start_run(config)
    data = ingest_data(config)
    base_model = fetch_model(config, run)
    tokens = tokenize_data(data, base_model, config)
    trained = run_training(fine_tune_request(tokens, data, base_model, config, run), config.training.train_on)
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
        reused_version=registered.reused,
    )
