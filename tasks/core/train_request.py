"""What the training stage takes and returns: ``TrainRequest`` and ``TrainResult``, small models of paths and URIs.

A request is all a deployment (``flows/train.py``) or a torchrun process (``python -m
finetune_flows.tasks.core.training request.json``) needs; the stage leaves its ``TrainResult`` as
``RESULT_FILE`` in the run folder. ``checkpoint_split`` says which split chooses a head's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.core.adapters import AdapterConfig
from finetune_flows.tasks.core.config import FinetuneConfig, InfrastructureConfig, TrainingConfig
from finetune_flows.tasks.core.stages import PreparedData
from finetune_flows.tasks.core.tokenization import TokenizeResult
from finetune_flows.tasks.core.tracking import RunInfo

RESULT_FILE = "train_result.json"


class TrainResult(BaseModel):
    """The trained checkpoint and what training measured."""

    model_config = ConfigDict(frozen=True)

    model_dir: str
    precision: str
    steps: int
    epochs: float
    train_seconds: float
    train_samples_per_second: float
    best_metric: float | None
    eval_metrics: dict[str, float]
    """The last evaluation during training (empty when training ended before the first one)."""
    world_size: int = 1
    """Processes that trained together (DDP); 1 without torchrun."""
    weights_checksum: float = 0.0
    """Sum of all final weights (float64): equal across the ranks of one DDP run, and across runs that agree."""
    checkpoint_split: str | None = "eval"
    """The split that chose the checkpoint and stopped training early ("select" or "eval"); None: the last one."""
    trained_parameters: int = 0
    """Parameters that training changed (a LoRA adapter: the adapter and the modules trained in full)."""
    total_parameters: int = 0
    """All parameters of the trained model (with an adapter: the frozen encoder, the adapter and copies)."""


class TrainRequest(BaseModel):
    """Everything the training stage needs, as paths, URIs and small models: a deployment can take it."""

    model_config = ConfigDict(frozen=True)

    tokenized_dir: str
    model_dir: str
    head: str
    id2label: dict[int, str]
    training: TrainingConfig
    adapter: AdapterConfig = AdapterConfig()
    """Full fine-tune or LoRA adapter (``tasks.core.adapters``)."""
    model_source: str = ""
    """``model.source`` as configured (what an adapter's ``base.json`` names); empty: ``model_dir``."""
    infrastructure: InfrastructureConfig = InfrastructureConfig()
    primary_metric: str
    run: RunInfo
    progress_key: str | None = None
    resume: bool = False
    """Continue the run folder's training from its last complete checkpoint (``finetune-flows resume``)."""

    @property
    def result_path(self) -> Path:
        """Where the stage leaves its ``TrainResult`` (next to the checkpoints, on shared storage)."""
        return Path(self.run.run_dir) / RESULT_FILE


def fine_tune_request(
    tokens: TokenizeResult, data: PreparedData, model_dir: str, config: FinetuneConfig, run: RunInfo
) -> TrainRequest:
    """The training stage's input, built from what the earlier stages returned."""
    return TrainRequest(
        tokenized_dir=tokens.tokenized_dir,
        model_dir=model_dir,
        head=config.head_name,
        id2label=data.id2label,
        training=config.training,
        adapter=config.adapter,
        model_source=config.model.source,
        infrastructure=config.infrastructure,
        primary_metric=config.primary_metric,
        run=run,
        progress_key=f"{config.scenario}-training-progress",
        resume=config.resume is not None,
    )


def checkpoint_split(head_name: str, has_select: bool) -> str | None:
    """Which split chooses ``head_name``'s checkpoint (and stops training early): "select" when the dataset has a
    selection split, else "eval"; None for a head that does not evaluate while training (the last model is kept)."""
    options = HEADS.get(head_name).trainer_options()
    if options.get("eval_strategy", "steps") == "no" or not options.get("load_best_model_at_end", True):
        return None
    return "select" if has_select else "eval"
