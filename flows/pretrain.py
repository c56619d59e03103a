"""Flow ``pretrain``: unlabelled text -> a domain-adapted encoder (masked-language-model training), registered.

Deployments reach it by entrypoint ``flows/pretrain.py:pretrain``. The stages: open the run, read the
corpus (a text file's column, a scenario's texts without labels, or the monitor's stored texts;
validated, deduplicated, a seeded share held back), fetch the encoder, tokenize (cached), train the
masked LM (whole-word masking; flow ``train-mlm`` as a subflow, or a run of deployment
``infrastructure.train_on``; torchrun with ``infrastructure.processes > 1``), export the encoder to ONNX
behind the parity gate, and register it as its own MLflow model. Fine-tuning then starts from it with
``model.source=models:/<name>@champion``. A failed run's state message names the stage.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.failures import ending_run, stage_failed
from finetune_flows.tasks.core.model_source import fetch_model
from finetune_flows.tasks.core.tracking import start_run
from finetune_flows.tasks.pretraining.config import PretrainConfig
from finetune_flows.tasks.pretraining.corpus import read_corpus
from finetune_flows.tasks.pretraining.masking import tokenize_texts
from finetune_flows.tasks.pretraining.pretraining import (
    PretrainRequest,
    PretrainResult,
    hand_off_mlm,
    train_mlm,
)
from finetune_flows.tasks.pretraining.registering import export_encoder, register_encoder

STAGES = (
    start_run, read_corpus, fetch_model, tokenize_texts, train_mlm, hand_off_mlm, export_encoder, register_encoder,
)  # fmt: skip


class PretrainSummary(BaseModel):
    """What a finished ``pretrain`` run produced."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    decision: str
    model_uri: str
    """Fine-tune from it with ``model.source=models:/<model_name>@<alias>``."""
    loss_before: float
    """MLM loss (cross-entropy per masked token) on the held-back texts before training."""
    loss_after: float
    perplexity_before: float
    perplexity_after: float
    head_built: bool
    corpus: str
    run_id: str
    onnx_path: str
    steps: int
    train_seconds: float
    reused_corpus: bool
    reused_tokens: bool


@flow(name="train-mlm", log_prints=False)
def train_mlm_stage(request: PretrainRequest) -> PretrainResult:
    """The masked-LM training stage as its own flow, so it can run on another work pool (the gpu one)."""
    try:
        return train_mlm(request)
    except Exception as exc:
        return stage_failed(exc, [train_mlm])


def run_mlm_training(request: PretrainRequest, deployment: str | None) -> PretrainResult:
    """The training stage: a subflow of the calling flow run, or a run of ``deployment`` when one is named."""
    return hand_off_mlm(request, deployment) if deployment else train_mlm_stage(request)


@flow(name="pretrain", log_prints=False)
def pretrain(config: PretrainConfig = PretrainConfig()) -> PretrainSummary:  # noqa: B008
    """Continue masked-language-model training of the encoder on unlabelled text and register the adapted encoder."""
    try:
        return run_pretraining(config)
    except Exception as exc:
        return stage_failed(exc, STAGES)


def run_pretraining(config: PretrainConfig) -> PretrainSummary:
    """The stages in order; a failure after the MLflow run is open leaves it FAILED, an interruption KILLED."""
    run = start_run(config)
    with ending_run(run, STAGES):
        corpus = read_corpus(config)
        base_model = fetch_model(config.model, run)
        tokens = tokenize_texts(corpus, base_model, config.model.max_length, config.training.whole_word)
        request = PretrainRequest(
            tokenized_dir=tokens.tokenized_dir, model_dir=base_model, training=config.training,
            infrastructure=config.infrastructure, run=run,
        )  # fmt: skip
        trained = run_mlm_training(request, config.infrastructure.train_on)
        exported = export_encoder(trained.model_dir, corpus, config.export, config.model.max_length)
        registered = register_encoder(config, corpus, tokens, trained, exported, run)
    return PretrainSummary(
        model_name=registered.model_name,
        version=registered.version,
        aliases=registered.aliases,
        decision=registered.decision,
        model_uri=registered.model_uri,
        loss_before=trained.loss_before,
        loss_after=trained.loss_after,
        perplexity_before=trained.perplexity_before,
        perplexity_after=trained.perplexity_after,
        head_built=trained.head_built,
        corpus=corpus.summary,
        run_id=run.run_id,
        onnx_path=exported.onnx_path,
        steps=trained.steps,
        train_seconds=trained.train_seconds,
        reused_corpus=corpus.cached,
        reused_tokens=tokens.cached,
    )
