"""The evaluate stage of the one pipeline: the head's own evaluation, logged to MLflow the same way for every head.

A head names its evaluation (``TaskHead.evaluator``, "module:Class"): a classifier gets the
classification report (``tasks.classification.evaluation``), a bi-encoder ranking metrics
(``tasks.ranking.evaluation``). An ``Evaluator`` scores the eval split (and the test split when
there is one, reported only) and can score a registered champion on the same data, so the
promotion gate compares like with like.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins import HEADS, PluginError
from finetune_flows.tasks.core.config import EvaluationConfig, FinetuneConfig
from finetune_flows.tasks.core.tracking import RunInfo

if TYPE_CHECKING:
    from finetune_flows.tasks.core.stages import PreparedData

logger = logging.getLogger(__name__)


class EvalRequest(BaseModel):
    """What an evaluation reads: the trained model (checkpoint and exported graph) and the prepared dataset."""

    model_config = ConfigDict(frozen=True)

    scenario: str
    head: str
    model_dir: str
    onnx_path: str
    dataset_dir: str
    labels: list[str] = Field(default_factory=list)
    primary_metric: str
    max_length: int
    evaluation: EvaluationConfig
    report_dir: str
    seed: int = 42


class EvalResult(BaseModel):
    """Metrics of the eval split (which promotion uses), the test split's (reported only), and the report files."""

    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float]
    primary_metric: str
    report_dir: str
    headline: list[str]
    """The metrics worth a version tag and a line in the summary."""
    test_metrics: dict[str, float] | None = None
    plots: list[str] = Field(default_factory=list)

    @property
    def primary(self) -> float:
        return self.metrics[self.primary_metric]


@runtime_checkable
class Evaluator(Protocol):
    """A head's evaluation."""

    headline: ClassVar[tuple[str, ...]]

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Score the eval (and test) split; write the report under ``request.report_dir``; publish UI artifacts."""
        ...

    def score_champion(self, model_uri: str, request: EvalRequest) -> float | None:
        """The primary metric of the registered model at ``model_uri`` on the same eval data; None: not comparable."""
        ...

    def score_graph(self, onnx_path: str, request: EvalRequest) -> float:
        """The primary metric of the ONNX graph at ``onnx_path`` (a candidate of the export ladder) on the eval
        split, scored as the served model scores."""
        ...

    def training_metrics(self, head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
        """One evaluation while training (Trainer's ``compute_metrics``): metrics by name, the scenario's primary
        metric among them, from the model's raw outputs and the label ids of the checkpoint-choosing split."""
        ...


def eval_request(
    config: FinetuneConfig, data: PreparedData, model_dir: str, onnx_path: str, run: RunInfo
) -> EvalRequest:
    """What the evaluate stage reads, from the config and what the earlier stages returned."""
    return EvalRequest(
        scenario=config.scenario,
        head=config.head_name,
        model_dir=model_dir,
        onnx_path=onnx_path,
        dataset_dir=data.dataset_dir,
        labels=data.labels,
        primary_metric=config.primary_metric,
        max_length=config.model.max_length,
        evaluation=config.evaluation,
        report_dir=str(Path(run.run_dir) / "evaluation"),
        seed=config.training.seed,
    )


def evaluator_for(head_name: str) -> Evaluator:
    """The evaluation ``head_name`` names, instantiated; a broken reference fails naming the head."""
    from finetune_flows.tasks.core.stages import load_target  # stages imports this module's models

    target = HEADS.get(head_name).evaluator
    evaluator = load_target(target, f"head {head_name!r}: its evaluator")()
    if not isinstance(evaluator, Evaluator):
        raise PluginError(
            f"head {head_name!r}: {target} is not an Evaluator "
            "(evaluate, score_champion, score_graph, training_metrics, headline)"
        )
    return evaluator


@task(name="evaluate")
def evaluate_model(request: EvalRequest, run: RunInfo) -> EvalResult:
    """Score the model with its head's evaluation; metrics and report files go to the run's MLflow run."""
    import mlflow

    result = evaluator_for(request.head).evaluate(request)
    mlflow.set_tracking_uri(run.tracking_uri())
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
        if result.test_metrics:
            mlflow.log_metrics({f"test_{k}": v for k, v in result.test_metrics.items()})
        if Path(result.report_dir).is_dir():
            mlflow.log_artifacts(result.report_dir, artifact_path="evaluation")
    logger.info(
        "evaluate: %s", ", ".join(f"{k} {result.metrics[k]:.4f}" for k in result.headline if k in result.metrics)
    )
    return result
