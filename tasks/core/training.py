"""Stage 3, fine-tune: HF Trainer with dynamic padding, length grouping and fused AdamW.

The stage takes a ``TrainRequest`` (``train_request``: paths, URIs and small models only), so it can run in the
pipeline's own process, as a flow on another work pool (``flows/train.py``), or across several
processes with torchrun (``training.processes``; DDP, gloo on CPU). ``python -m tasks.training
request.json`` is the entry point each torchrun process runs.

Early stopping on the scenario's metric, measured on the dataset's ``select`` split when it has one
(so eval stays held out), else on ``eval``; checkpoints in the run folder (never overwritten; each
marked complete when fully written, so a killed run resumes from the last complete one with
Trainer's own resume, loading no pickles: ``resumable_trainer``; once training succeeded only those
``training.keep_checkpoints`` names stay, without their resume state),
with ``adapter.method=lora`` a LoRA adapter over the frozen encoder, saved apart and merged (``adapters``),
bf16 autocast only where the hardware runs it fast, metrics streamed to the active MLflow run
by Trainer's own MLflow callback, and extra callbacks (the Prefect progress artifact) passed in.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.core.adapters import (
    ADAPTER_SUBDIR,
    AdapterConfig,
    TrainingMethod,
    merge_adapter,
    save_adapter,
    trainable_parameters,
    weights_sha256,
    wrap_with_adapter,
)
from finetune_flows.tasks.core.checkpoints import drop_resume_state, resume_point
from finetune_flows.tasks.core.config import ClassWeighting, KeepCheckpoints, Precision, TrainingConfig
from finetune_flows.tasks.core.evaluating import evaluator_for
from finetune_flows.tasks.core.housekeeping import prune_checkpoints
from finetune_flows.tasks.core.model_source import TOKENIZER_FILES
from finetune_flows.tasks.core.train_request import TrainRequest, TrainResult, checkpoint_split
from finetune_flows.tasks.core.training_options import balanced_class_weights, choose_precision, layerwise_optimizer

logger = logging.getLogger(__name__)


def weights_checksum(model: Any) -> float:
    """Sum of all parameters in float64: a cheap fingerprint to compare two trainings' weights."""
    return float(sum(float(p.detach().double().sum()) for p in model.parameters()))


def train_model(
    tokenized_dir: Path,
    model_dir: Path,
    head_name: str,
    id2label: dict[int, str],
    config: TrainingConfig,
    run_dir: Path,
    primary_metric: str,
    callbacks: list[Any] | None = None,
    report_to_mlflow: bool = False,
    resume: bool = False,
    adapter: AdapterConfig | None = None,
    base_source: str = "",
) -> TrainResult:
    """Fine-tune the encoder at ``model_dir`` with ``head_name``'s model, batches and options; the best (or, for a
    head that does not evaluate while training, the last) model lands in ``run_dir/model``. With ``resume``,
    training continues from the last complete checkpoint in ``run_dir`` (from the start when there is none).

    With ``adapter.method`` lora, a LoRA adapter trains over the frozen encoder (``tasks.core.adapters``); the
    adapter is saved to ``run_dir/adapter`` (naming ``base_source``, default ``model_dir``) and merged, so
    ``run_dir/model`` is a plain checkpoint either way."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, EarlyStoppingCallback, TrainingArguments, set_seed

    from finetune_flows.tasks.core.resumable_trainer import ResumableTrainer

    set_seed(config.seed)
    head = HEADS.get(head_name)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    model = head.build_model(str(model_dir), id2label)
    lora = adapter is not None and adapter.method is TrainingMethod.LORA
    if adapter is not None and lora:
        model = wrap_with_adapter(model, head, adapter)
    trained_parameters, total_parameters = trainable_parameters(model)
    logger.info(
        "%s: %d of %d parameters train (%.2f%%)", "LoRA adapter" if lora else "full fine-tune",
        trained_parameters, total_parameters, 100.0 * trained_parameters / max(total_parameters, 1),
    )  # fmt: skip
    train_set = load_from_disk(str(tokenized_dir / "train"))
    chooser = checkpoint_split(head_name, (tokenized_dir / "select").is_dir())
    eval_set = load_from_disk(str(tokenized_dir / (chooser or "eval")))
    precision = choose_precision(config.precision)

    evaluator, labels = evaluator_for(head_name), list(id2label.values())

    def compute_metrics(prediction: Any) -> dict[str, float]:
        return evaluator.training_metrics(head_name, prediction.predictions, prediction.label_ids, labels)

    balanced = config.class_weights is ClassWeighting.BALANCED and bool(id2label)
    weights = torch.tensor(
        balanced_class_weights(train_set["labels"], len(id2label)) if balanced else [], dtype=torch.float32
    )

    def weighted_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs["logits"]
        return torch.nn.functional.cross_entropy(
            logits.float(), labels, weight=weights.to(logits.device), label_smoothing=config.label_smoothing
        )

    if balanced:
        logger.info("class weights: %s", dict(zip(id2label.values(), weights.tolist(), strict=True)))

    # A run folder is never reused but to resume; under torchrun every rank makes the folder (the launcher checked).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoints = run_dir / "checkpoints"
    start = resume_point(checkpoints) if resume else None  # under torchrun the launcher set incomplete ones aside
    checkpoints.mkdir(parents=True, exist_ok=resume or world_size > 1)
    options: dict[str, Any] = dict(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(config.batch_size, 64),
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        label_smoothing_factor=config.label_smoothing,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused",
        bf16=precision is Precision.BF16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length",
        eval_strategy="steps",
        eval_steps=config.eval_every_steps,
        save_strategy="steps",
        save_steps=config.eval_every_steps,
        save_total_limit=None if config.keep_checkpoints is KeepCheckpoints.ALL else 2,
        save_only_model=False,  # optimizer, scheduler and RNG states too: a killed run resumes exactly
        load_best_model_at_end=True,
        metric_for_best_model=primary_metric,
        greater_is_better=True,
        logging_steps=max(1, min(50, config.eval_every_steps)),
        report_to=["mlflow"] if report_to_mlflow else "none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,  # CPU DDP
    )
    args = TrainingArguments(**{**options, **head.trainer_options()})
    evaluates = args.eval_strategy != "no"
    stopping = [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)]
    trainer = ResumableTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if evaluates else None,
        data_collator=head.collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics if evaluates else None,
        compute_loss_func=weighted_loss if balanced else None,
        callbacks=[*(stopping if args.load_best_model_at_end else []), *(callbacks or [])],
    )
    if config.layer_lr_decay < 1.0:  # train() builds its own optimizer (fused AdamW) only when none is set
        trainer.optimizer = layerwise_optimizer(trainer, config)
    logger.info(
        "training %s on %d examples (%s, batch %d, lr %g, layer decay %g, label smoothing %g); checkpoint chosen "
        "on %s", head_name, len(train_set), precision.value, config.batch_size, config.learning_rate,
        config.layer_lr_decay, config.label_smoothing,
        f"{chooser} ({len(eval_set)} rows)" if chooser and evaluates else "nothing (the last is kept)",
    )  # fmt: skip
    if start is not None:
        logger.info("resuming from %s", start)
    output = trainer.train(resume_from_checkpoint=str(start) if start else None)
    # The evaluate stage scores the final model in full; here keep the last in-training evaluation.
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    last_eval = evaluations[-1] if evaluations else {}

    final_dir = run_dir / "model"
    trained = trainer.model
    if lora:  # the adapter on its own, then merged: the saved model is a plain checkpoint
        if trainer.is_world_process_zero():
            save_adapter(trained, run_dir / ADAPTER_SUBDIR, base_source or str(model_dir), weights_sha256(model_dir))
        trained = merge_adapter(trained)
    if trainer.is_world_process_zero():  # the main process writes the model
        final_dir.mkdir(parents=True, exist_ok=True)
        head.save_trained(trained, model_dir, final_dir)
        for name in TOKENIZER_FILES:  # keep the original tokenizer files byte for byte (their hash is the identity)
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, final_dir / name)
        removed = prune_checkpoints(checkpoints, trainer.state.best_model_checkpoint, config.keep_checkpoints)
        if removed:
            logger.info("removed %d checkpoints (keep_checkpoints=%s)", len(removed), config.keep_checkpoints.value)
        drop_resume_state(checkpoints)  # a finished training is not resumed: keep the models only
    return TrainResult(
        model_dir=str(final_dir),
        precision=precision.value,
        steps=output.global_step,
        epochs=float(output.metrics.get("epoch", config.epochs)),
        train_seconds=float(output.metrics["train_runtime"]),
        train_samples_per_second=float(output.metrics["train_samples_per_second"]),
        best_metric=trainer.state.best_metric,
        eval_metrics={k: float(v) for k, v in last_eval.items() if isinstance(v, int | float)},
        world_size=args.world_size,
        weights_checksum=weights_checksum(trained),
        checkpoint_split=chooser if evaluates and args.load_best_model_at_end else None,
        trained_parameters=trained_parameters,
        total_parameters=total_parameters,
    )


def train_tracked(request: TrainRequest, callbacks: list[Any] | None = None) -> TrainResult:
    """``train_model`` for a request, streaming metrics to the run's MLflow run (from the main process only)."""
    import mlflow
    import torch

    from finetune_flows.tasks.core.secrets import install_log_redaction
    from finetune_flows.tasks.core.settings import get_settings

    install_log_redaction()  # a worker or torchrun process: its logs too
    if get_settings().torch_threads:
        torch.set_num_threads(get_settings().torch_threads)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if request.resume and request.result_path.is_file() and (Path(request.run.run_dir) / "model").is_dir():
        logger.info("training of run %s had finished: keeping its model", request.run.run_id)
        return TrainResult.model_validate_json(request.result_path.read_text(encoding="utf-8"))

    def train() -> TrainResult:
        return train_model(
            Path(request.tokenized_dir),
            Path(request.model_dir),
            request.head,
            request.id2label,
            request.training,
            Path(request.run.run_dir),
            request.primary_metric,
            callbacks=callbacks,
            report_to_mlflow=main_process,
            resume=request.resume,
            adapter=request.adapter,
            base_source=request.model_source,
        )

    if not main_process:
        return train()
    mlflow.set_tracking_uri(request.run.tracking_uri())
    with mlflow.start_run(run_id=request.run.run_id):
        result = train()
        mlflow.log_metrics(
            {"train_samples_per_second": result.train_samples_per_second, "train_seconds": result.train_seconds}
        )
        mlflow.set_tags({"precision": result.precision, "world_size": str(result.world_size)})
    request.result_path.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun process: train the request in the JSON file ``argv[0]``."""
    # force: importing Prefect configured the root logger already; here the launcher reads stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    request = TrainRequest.model_validate_json(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    result = train_tracked(request)
    logger.info(
        "rank %s of %d: %d steps, weights checksum %.6f",
        os.environ.get("RANK", "0"), result.world_size, result.steps, result.weights_checksum,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
