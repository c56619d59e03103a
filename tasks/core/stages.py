"""What the stages of the one pipeline hand each other, and how a scenario's extra stages run.

Every head reads the same prepared dataset: a content-hashed folder with ``train.parquet`` and
``eval.parquet`` (``test.parquet`` when there is a test split) whose columns are the head's
``text_columns`` (plus ``label``/``label_id`` for classifiers). The generic ingest writes it for
labelled text; a scenario with its own data (an interaction log) writes it in a ``PREPARE`` stage.

A scenario's ``extra_stages`` name plain functions ("module:function") that take a
``StageContext``; they are imported only when they run, each as a Prefect task of its own name,
so a broken stage fails naming the scenario and the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins import SCENARIOS, PluginError
from finetune_flows.plugins.specs import ExtraStage, StageHook
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.evaluating import EvalResult
from finetune_flows.tasks.core.failures import STAGE_ATTRIBUTE
from finetune_flows.tasks.core.tracking import RunInfo


class PreparedData(BaseModel):
    """The prepared dataset every head trains and is evaluated on, and what went into it."""

    model_config = ConfigDict(frozen=True)

    dataset_dir: str
    data_hash: str
    """Hash of the input data (files and reading options): the identity of the training data."""
    eval_hash: str
    """Hash of the eval data: two versions' metrics compare only when it is the same."""
    labels: list[str] = Field(default_factory=list)
    """Class names in id order (empty for heads without a label set)."""
    train_rows: int
    eval_rows: int
    test_rows: int = 0
    cached: bool = False
    summary: str = ""
    """One line on what was read and how it was split, for the run's summary."""

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


class StageContext(BaseModel):
    """What a scenario's extra stage can read: the run's config, its folder and what earlier stages returned."""

    model_config = ConfigDict(frozen=True)

    config: FinetuneConfig
    run: RunInfo
    data: PreparedData | None = None
    model_dir: str | None = None
    onnx_path: str | None = None
    evaluation: EvalResult | None = None


class StageOutput(BaseModel):
    """What a ``BEFORE_REGISTER`` stage adds to the registered version."""

    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float] = Field(default_factory=dict)
    """Logged to the run's MLflow run."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Set on the registered version (and the run)."""
    served_artifacts: dict[str, str] = Field(default_factory=dict)
    """Files or folders shipped with the served model: artifact name -> local path."""
    report: str | None = None
    """A Markdown report (path) shown at the end of the run."""


def scenario_stages(scenario: str, hook: StageHook) -> list[ExtraStage]:
    """The extra stages ``scenario`` declares for ``hook``, in declaration order."""
    return [stage for stage in SCENARIOS.get(scenario).extra_stages if stage.hook is hook]


def load_target(target: str, owner: str) -> Callable[..., Any]:
    """What ``"module:attribute"`` names, loaded the way an entry point is; a failure names ``owner``."""
    try:
        loaded: Callable[..., Any] = EntryPoint(name=owner, value=target, group="finetune_flows.targets").load()
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{owner}: cannot load {target!r}: {type(exc).__name__}: {exc}") from exc
    return loaded


def call_stage(stage: ExtraStage, context: StageContext) -> Any:
    """Run ``stage`` (of ``context.config.scenario``) as a Prefect task named after it."""
    function = load_target(stage.target, f"scenario {context.config.scenario!r}, stage {stage.name!r}")
    try:
        return task(name=stage.name)(function)(context)
    except Exception as exc:
        setattr(exc, STAGE_ATTRIBUTE, stage.name)  # the failed run's message names the scenario's stage
        raise


def prepare_with_stage(context: StageContext) -> PreparedData | None:
    """The scenario's ``PREPARE`` stage result, or None when it reads its data with the generic ingest."""
    stages = scenario_stages(context.config.scenario, StageHook.PREPARE)
    if len(stages) > 1:
        raise PluginError(f"scenario {context.config.scenario!r} declares {len(stages)} prepare stages; one at most")
    if not stages:
        return None
    prepared = call_stage(stages[0], context)
    if not isinstance(prepared, PreparedData):
        raise PluginError(
            f"scenario {context.config.scenario!r}, stage {stages[0].name!r} returned {type(prepared).__name__}, "
            "not PreparedData"
        )
    return prepared


def run_before_register(context: StageContext) -> list[StageOutput]:
    """Every ``BEFORE_REGISTER`` stage of the scenario, in order; each must return a ``StageOutput``."""
    outputs = []
    for stage in scenario_stages(context.config.scenario, StageHook.BEFORE_REGISTER):
        output = call_stage(stage, context)
        if not isinstance(output, StageOutput):
            raise PluginError(
                f"scenario {context.config.scenario!r}, stage {stage.name!r} returned {type(output).__name__}, "
                "not StageOutput"
            )
        outputs.append(output)
    return outputs
