"""Flow ``finetune``: data -> fine-tuned, exported, evaluated, registered model, for every head and scenario.

Deployments reach it by entrypoint ``flows/finetune.py:finetune``. The head plugin decides how
batches are built, what is trained, exported, served and how it is evaluated; the scenario how
its data reads and which extra stages it adds (its ``PREPARE`` stage replaces the generic ingest;
its ``BEFORE_REGISTER`` stages add metrics, tags and served files). The training stage is flow
``train`` (flows/train.py): a subflow here, or a run of deployment ``infrastructure.train_on`` on
another work pool. A failed run's state message names the stage: "stage evaluate failed: ...".
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from finetune_flows.flows.train import run_training, train_stage
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.data_preparation import ingest_data, prepare_data
from finetune_flows.tasks.core.evaluating import eval_request, evaluate_model
from finetune_flows.tasks.core.failures import ending_run, stage_failed
from finetune_flows.tasks.core.ingestion import IngestResult
from finetune_flows.tasks.core.launching import fine_tune, hand_off_training
from finetune_flows.tasks.core.model_source import fetch_model
from finetune_flows.tasks.core.resuming import reopen_run
from finetune_flows.tasks.core.stages import StageContext, run_before_register
from finetune_flows.tasks.core.tokenization import tokenize_data
from finetune_flows.tasks.core.tracking import RunInfo, start_run
from finetune_flows.tasks.core.train_request import fine_tune_request
from finetune_flows.tasks.export.model_export import export_model
from finetune_flows.tasks.export.serving_choice import choose_served_graph
from finetune_flows.tasks.publishing.stage import register_version

STAGES = (
    start_run, reopen_run, ingest_data, fetch_model, tokenize_data, train_stage, fine_tune, hand_off_training,
    export_model, choose_served_graph, evaluate_model, register_version,
)  # fmt: skip


EVAL_NOTES = {
    "eval": "eval figures are optimistic: the same split chose the checkpoint (data.select_fraction holds it out)",
    "select": "eval is held out: the select split chose the checkpoint",
    None: "eval is held out: training kept its last model",
}


class FinetuneSummary(BaseModel):
    """What a finished run produced."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    decision: str
    metrics: dict[str, float]
    """Headline metrics on eval, and on test (``test_`` prefix) where there is a test split."""
    onnx_path: str
    """The served graph (``served_variant``: fp32, fused or an int8 variant the export ladder chose)."""
    run_id: str
    data_summary: str
    reused_ingest: bool
    reused_tokens: bool
    train_seconds: float
    reports: list[str] = []
    """Markdown reports of the scenario's extra stages (e.g. the ranking table against baselines)."""
    reused_version: bool = False
    """True when the version was registered by an earlier run with the same idempotency key."""
    splits: str = ""
    """Which rows trained, selected the checkpoint, evaluated and tested, and where each came from."""
    checkpoint_split: str | None = None
    """The split that chose the checkpoint and stopped training early ("select", "eval"); None: the last one."""
    eval_note: str = ""
    served_variant: str = "fp32"
    """Whether the eval figures are held out or optimistic (the eval split also chose the checkpoint)."""


@flow(name="finetune", log_prints=False)
def finetune(config: FinetuneConfig = FinetuneConfig()) -> FinetuneSummary:  # noqa: B008
    """Fine-tune a text model for a scenario, export it to ONNX, evaluate it and register it."""
    try:
        return run_pipeline(config)
    except Exception as exc:
        return stage_failed(exc, STAGES)


def run_pipeline(config: FinetuneConfig) -> FinetuneSummary:
    """The stages in order; each passes paths and small models to the next. A failure after the MLflow run is
    open leaves that run FAILED, an interruption (SIGTERM, Ctrl-C) KILLED, naming the stage; either can be resumed
    (``config.resume``)."""
    run = reopen_run(config) if config.resume else start_run(config)
    with ending_run(run, STAGES):
        return run_stages(config, run)


def run_stages(config: FinetuneConfig, run: RunInfo) -> FinetuneSummary:
    """Every stage after the run is open."""
    data = prepare_data(config, run)
    base_model = fetch_model(config.model, run)
    tokens = tokenize_data(data, base_model, config.head_name, config.model.max_length)
    request = fine_tune_request(tokens, data, base_model, config, run)
    trained = run_training(request, config.infrastructure.train_on)
    exported = export_model(
        trained.model_dir, config.head_name, data.dataset_dir, config.export, config.model.max_length,
        tokens.tokenizer_hash, run,
    )  # fmt: skip
    served = choose_served_graph(
        eval_request(config, data, trained.model_dir, exported.onnx_path, run), config.export, run
    )
    evaluation = evaluate_model(eval_request(config, data, trained.model_dir, served.served_path, run), run)
    context = StageContext(
        config=config, run=run, data=data, model_dir=trained.model_dir, onnx_path=served.served_path,
        evaluation=evaluation,
    )  # fmt: skip
    extras = run_before_register(context)
    registered = register_version(config, data, tokens, evaluation, exported, served, extras, trained.model_dir, run)
    return FinetuneSummary(
        model_name=registered.model_name,
        version=registered.version,
        aliases=registered.aliases,
        decision=registered.decision,
        metrics={
            **{k: v for k, v in evaluation.metrics.items() if k in evaluation.headline},
            **{f"test_{k}": v for k, v in (evaluation.test_metrics or {}).items() if k in evaluation.headline},
        },
        onnx_path=served.served_path,
        served_variant=served.served_variant,
        run_id=registered.run_id,
        data_summary=data.summary,
        reused_ingest=data.cached,
        reused_tokens=tokens.cached,
        train_seconds=trained.train_seconds,
        reports=[extra.report for extra in extras if extra.report],
        reused_version=registered.reused,
        splits=data.splits if isinstance(data, IngestResult) else data.summary,
        checkpoint_split=trained.checkpoint_split,
        eval_note=EVAL_NOTES[trained.checkpoint_split],
    )
