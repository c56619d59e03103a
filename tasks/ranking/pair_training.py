"""Fine-tune a bi-encoder on (profile, liked item) pairs with HF Trainer and in-batch negatives.

Each batch holds ``batch_size`` pairs; every other item of the batch is a negative for a profile
(the multiple-negatives ranking loss of the ``bi-encoder`` head). Texts are tokenized per batch
and padded to the batch's longest (dynamic padding). The result is a plain encoder folder (the
Hugging Face checkpoint, the original tokenizer files and the sentence-transformers pooling
config), which ``tasks.export.encoder_export`` exports with its pooling.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.core.model_source import TOKENIZER_FILES
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.core.training_options import choose_precision
from finetune_flows.tasks.ranking.config import PairTrainingConfig, RecommenderConfig
from finetune_flows.tasks.ranking.dataset import RankingData

logger = logging.getLogger(__name__)

POOLING_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


class PairTrainResult(BaseModel):
    """The fine-tuned encoder folder and what training measured."""

    model_config = ConfigDict(frozen=True)

    model_dir: str
    precision: str
    steps: int
    pairs: int
    train_seconds: float
    pairs_per_second: float
    final_loss: float | None


class PairCollator:
    """Tokenizes a batch of {profile, item_text} rows into the bi-encoder's two inputs."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, str]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for side, column in (("query", "profile"), ("item", "item_text")):
            encoded = self.tokenizer(
                [row[column] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            batch[f"{side}_input_ids"] = encoded["input_ids"]
            batch[f"{side}_attention_mask"] = encoded["attention_mask"]
        return batch


def save_encoder(model: Any, source: Path, out: Path) -> Path:
    """The trained encoder with the source's tokenizer files (byte for byte) and pooling config."""
    model.encoder.save_pretrained(str(out), safe_serialization=True)
    for name in (*TOKENIZER_FILES, *POOLING_FILES):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if (source / "1_Pooling").is_dir():
        shutil.copytree(source / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    return out


def train_pairs(
    pairs: pd.DataFrame, model_dir: Path, out_dir: Path, head_name: str, max_length: int, config: PairTrainingConfig
) -> PairTrainResult:
    """Fine-tune the encoder at ``model_dir`` on ``pairs`` (profile, item_text); saves to ``out_dir/model``."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    model = HEADS.get(head_name).build_model(str(model_dir), {})
    precision = choose_precision(config.precision)
    dataset = Dataset.from_pandas(pairs[["profile", "item_text"]].reset_index(drop=True))
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=False)  # a run folder is never reused
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=0.01,
        optim="adamw_torch_fused",
        bf16=precision.value == "bf16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_drop_last=True,  # in-batch negatives want full batches
        eval_strategy="no",
        save_strategy="no",
        logging_steps=25,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PairCollator(tokenizer, max_length))
    logger.info("training %s on %d pairs (%s, batch %d)", head_name, len(dataset), precision.value, config.batch_size)
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final = save_encoder(model, model_dir, out_dir / "model")
    seconds = float(output.metrics["train_runtime"])
    return PairTrainResult(
        model_dir=str(final),
        precision=precision.value,
        steps=output.global_step,
        pairs=output.global_step * config.batch_size,
        train_seconds=seconds,
        pairs_per_second=output.global_step * config.batch_size / max(seconds, 1e-9),
        final_loss=float(losses[-1]) if losses else None,
    )


@task(name="fine-tune-pairs")
def fine_tune_pairs(data: RankingData, model_dir: str, config: RecommenderConfig, run: RunInfo) -> PairTrainResult:
    """Fine-tune the shared encoder on the split's training pairs; loss and speed go to MLflow."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    result = train_pairs(
        data.training_pairs(),
        Path(model_dir),
        Path(run.run_dir),
        config.head_name,
        config.model.max_length,
        config.training,
    )
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics(
            {
                "train_seconds": result.train_seconds,
                "train_pairs_per_second": result.pairs_per_second,
                **({"train_loss": result.final_loss} if result.final_loss is not None else {}),
            }
        )
        mlflow.set_tag("precision", result.precision)
    return result
