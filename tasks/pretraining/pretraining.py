"""The masked-LM training stage: the MLM model of ``mlm_head``, HF Trainer, the loss on held-back text before and after.

The stage takes a ``PretrainRequest`` (paths, URIs and small models), so it runs in the flow's own process or,
with ``infrastructure.processes > 1``, across processes with torchrun (``python -m
finetune_flows.tasks.pretraining.pretraining request.json`` is what each process runs; DDP, gloo on CPU), as
fine-tuning's training stage does. Checkpoints go to the run folder through ``ResumableTrainer`` (no pickles) and
are removed once the adapted encoder is in ``run_dir/model`` (``save_adapted_encoder``; a pretrain run is not
resumed: a rerun reuses the cached corpus and token ids); the result goes to ``RESULT_FILE``.
The MLM loss on the held-back texts is measured with fixed masks before and after training (perplexity =
exp(loss)) and logged to the run's MLflow run as ``mlm_loss_before`` / ``mlm_loss_after``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.config import InfrastructureConfig, Precision
from finetune_flows.tasks.core.launching import run_torchrun
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.pretraining.config import MaskedLMTraining

logger = logging.getLogger(__name__)

RESULT_FILE = "pretrain_result.json"
REQUEST_FILE = "pretrain_request.json"


class PretrainRequest(BaseModel):
    """Everything the MLM training stage needs, as paths, URIs and small models."""

    model_config = ConfigDict(frozen=True)

    tokenized_dir: str
    model_dir: str
    training: MaskedLMTraining
    infrastructure: InfrastructureConfig = InfrastructureConfig()
    run: RunInfo

    @property
    def result_path(self) -> Path:
        return Path(self.run.run_dir) / RESULT_FILE


class PretrainResult(BaseModel):
    """The adapted encoder and what training measured."""

    model_config = ConfigDict(frozen=True)

    model_dir: str
    head_built: bool
    """True when the checkpoint had no MLM head and one was built (``mlm_head.masked_lm_from_encoder``)."""
    loss_before: float
    loss_after: float
    steps: int
    train_seconds: float
    precision: str
    world_size: int = 1
    weights_checksum: float = 0.0
    """Sum of all final weights (float64): equal across the ranks of one DDP run."""

    @property
    def perplexity_before(self) -> float:
        return math.exp(self.loss_before)

    @property
    def perplexity_after(self) -> float:
        return math.exp(self.loss_after)


def train_masked_lm(request: PretrainRequest, report_to_mlflow: bool = False) -> PretrainResult:
    """Train the MLM on ``train/`` and measure it on ``held_back/`` before and after; the main process saves the
    adapted encoder to ``run_dir/model``."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    from finetune_flows.tasks.core.resumable_trainer import ResumableTrainer
    from finetune_flows.tasks.core.training import weights_checksum
    from finetune_flows.tasks.core.training_options import choose_precision
    from finetune_flows.tasks.pretraining.masking import held_back_loss, mlm_collator
    from finetune_flows.tasks.pretraining.mlm_head import masked_lm_from_encoder, save_adapted_encoder

    config = request.training
    set_seed(config.seed)
    model_dir, run_dir = Path(request.model_dir), Path(request.run.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    model, built = masked_lm_from_encoder(model_dir)
    train_set = load_from_disk(str(Path(request.tokenized_dir) / "train"))
    held_back = load_from_disk(str(Path(request.tokenized_dir) / "held_back"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    precision = choose_precision(config.precision)
    use_cpu = not torch.cuda.is_available()
    if not use_cpu:
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    loss_before = held_back_loss(model, held_back, tokenizer, config) if main_process else math.nan
    checkpoints = run_dir / "mlm_checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=world_size > 1)  # a run folder is never reused
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused",
        bf16=precision is Precision.BF16,
        use_cpu=use_cpu,
        eval_strategy="no",  # the held-back loss is measured before and after, with fixed masks
        save_strategy="steps",
        save_steps=config.save_every_steps,
        save_total_limit=2,
        remove_unused_columns=False,  # the collator reads the special-token mask and offsets, then drops them
        logging_steps=max(1, min(50, config.save_every_steps)),
        report_to=["mlflow"] if report_to_mlflow else "none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        ddp_backend="gloo" if world_size > 1 and use_cpu else None,
    )
    trainer = ResumableTrainer(
        model=model, args=args, train_dataset=train_set, data_collator=mlm_collator(tokenizer, config),
        processing_class=tokenizer,
    )  # fmt: skip
    logger.info(
        "masked-LM training on %d texts (%s, batch %d, lr %g, %s masking of %.0f%%); MLM head %s",
        len(train_set), precision.value, config.batch_size, config.learning_rate,
        "whole-word" if config.whole_word else "token", 100 * config.mlm_probability, "built" if built else "loaded",
    )  # fmt: skip
    output = trainer.train()
    loss_after = math.nan
    if main_process:
        loss_after = held_back_loss(model, held_back, tokenizer, config)
        save_adapted_encoder(trainer.accelerator.unwrap_model(model), model_dir, run_dir / "model")
        shutil.rmtree(checkpoints, ignore_errors=True)  # the adapted encoder is saved; a rerun reuses corpus and tokens
    logger.info("MLM loss on held-back text: %.4f -> %.4f", loss_before, loss_after)
    return PretrainResult(
        model_dir=str(run_dir / "model"),
        head_built=built,
        loss_before=loss_before,
        loss_after=loss_after,
        steps=output.global_step,
        train_seconds=float(output.metrics["train_runtime"]),
        precision=precision.value,
        world_size=args.world_size,
        weights_checksum=weights_checksum(model),
    )


def train_tracked_mlm(request: PretrainRequest) -> PretrainResult:
    """``train_masked_lm``, logging to the run's MLflow run from the main process, which writes ``RESULT_FILE``."""
    import mlflow
    import torch

    from finetune_flows.tasks.core.secrets import install_log_redaction
    from finetune_flows.tasks.core.settings import get_settings

    install_log_redaction()
    if get_settings().torch_threads:
        torch.set_num_threads(get_settings().torch_threads)
    if int(os.environ.get("RANK", "0")) != 0:
        return train_masked_lm(request)
    mlflow.set_tracking_uri(request.run.tracking_uri())
    with mlflow.start_run(run_id=request.run.run_id):
        result = train_masked_lm(request, report_to_mlflow=True)
        mlflow.log_metrics(
            {
                "mlm_loss_before": result.loss_before,
                "mlm_loss_after": result.loss_after,
                "mlm_perplexity_before": result.perplexity_before,
                "mlm_perplexity_after": result.perplexity_after,
                "train_seconds": result.train_seconds,
            }
        )
        mlflow.set_tags({"mlm_head": "built" if result.head_built else "loaded", "world_size": str(result.world_size)})
    request.result_path.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    return result


def launch_masked_lm(request: PretrainRequest) -> PretrainResult:
    """Train in this process, or with ``torchrun --nproc_per_node N -m finetune_flows.tasks.pretraining.pretraining``
    (``infrastructure.processes > 1``), whose output goes to this log; the main process writes the result read here."""
    processes = request.infrastructure.processes
    if processes <= 1:
        return train_tracked_mlm(request)
    request_path = Path(request.run.run_dir) / REQUEST_FILE
    request_path.write_text(request.model_dump_json(indent=2), encoding="utf-8")
    run_torchrun("finetune_flows.tasks.pretraining.pretraining", request_path, processes)
    return PretrainResult.model_validate_json(request.result_path.read_text(encoding="utf-8"))


@task(name="train-masked-lm")
def train_mlm(request: PretrainRequest) -> PretrainResult:
    """Train the masked LM, in this process or across ``infrastructure.processes`` with torchrun."""
    return launch_masked_lm(request)


@task(name="hand-off-masked-lm")
def hand_off_mlm(request: PretrainRequest, deployment: str) -> PretrainResult:
    """Run the MLM training stage as ``deployment`` (flow ``train-mlm`` on another pool), wait, read its result."""
    from typing import cast

    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    from finetune_flows.tasks.core.launching import wait_for_flow_run

    logger.info("handing masked-LM training to deployment %s", deployment)
    flow_run = cast(
        FlowRun, run_deployment(name=deployment, parameters={"request": request.model_dump(mode="json")}, timeout=0)
    )
    flow_run = wait_for_flow_run(flow_run, request.infrastructure.start_timeout_s)
    if flow_run.state is None or not flow_run.state.is_completed():
        state = flow_run.state
        raise RuntimeError(
            f"masked-LM training run {flow_run.name!r} of deployment {deployment!r} ended "
            f"{state.name if state else 'without a state'}: {state.message if state else ''}"
        )
    return PretrainResult.model_validate_json(request.result_path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun process: train the request in the JSON file ``argv[0]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    request = PretrainRequest.model_validate_json(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    result = train_tracked_mlm(request)
    logger.info(
        "rank %s of %d: %d steps, weights checksum %.6f",
        os.environ.get("RANK", "0"), result.world_size, result.steps, result.weights_checksum,
    )  # fmt: skip
    return 0


def summary_of(result: PretrainResult) -> dict[str, Any]:
    """The headline figures of a result, for the flow's summary and the version's tags."""
    return {
        "mlm_loss_before": result.loss_before,
        "mlm_loss_after": result.loss_after,
        "mlm_perplexity_before": result.perplexity_before,
        "mlm_perplexity_after": result.perplexity_after,
    }


if __name__ == "__main__":
    raise SystemExit(main())
