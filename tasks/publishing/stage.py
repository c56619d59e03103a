"""The register stage of the one pipeline: the head's served model, the evidence tags, and ``publish_version``.

Whatever the head, the registered version is an MLflow models-from-code pyfunc (the head's
``serving_entry``) that runs the parity-checked ONNX graph with the model's own tokenizer and
ships a self-contained copy of ``tasks/serving`` (no finetune-flows needed to serve it). A LoRA run's
version keeps its small adapter too (artifact ``adapter``, over the base its ``base.json`` names). The
scenario's ``BEFORE_REGISTER`` stages add files (the finance topic encoder, the ranking table)
and tags. The input example is the run's own first eval rows. A champion measured on another
eval set is re-scored by the head's evaluation on this run's eval data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact

from finetune_flows.plugins import HEADS, PluginError
from finetune_flows.tasks.core.adapters import ADAPTER_SUBDIR, TrainingMethod
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.evaluating import EvalResult, eval_request, evaluator_for
from finetune_flows.tasks.core.ingestion import IngestResult
from finetune_flows.tasks.core.model_source import HF_SUBDIR
from finetune_flows.tasks.core.stages import PreparedData, StageOutput
from finetune_flows.tasks.core.tokenization import TokenizeResult
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.core.train_request import checkpoint_split
from finetune_flows.tasks.export.onnx_graph import ExportResult
from finetune_flows.tasks.export.serving_choice import LadderResult
from finetune_flows.tasks.publishing.promotion import NotComparable
from finetune_flows.tasks.publishing.registration import (
    RegisterResult,
    ServedModel,
    publish_version,
    summary_markdown,
)
from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from finetune_flows.tasks.serving.packaging import served_code_paths, serving_requirements

EXAMPLE_ROWS = 3


def entry_file(head_name: str) -> str:
    """The models-from-code file of ``head_name``'s ``serving_entry`` module (found, not imported)."""
    module = HEADS.get(head_name).serving_entry
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PluginError(f"head {head_name!r}: serving entry module {module!r} not found")
    return spec.origin


def input_example(dataset_dir: Path, columns: tuple[str, ...]) -> list[str] | dict[str, list[str]]:
    """The first eval rows as the served model takes them: texts for one column, columns of texts for several."""
    frame = pd.read_parquet(dataset_dir / "eval.parquet", columns=list(columns)).head(EXAMPLE_ROWS)
    if len(columns) == 1:
        return frame[columns[0]].astype(str).tolist()
    return {column: frame[column].astype(str).tolist() for column in columns}


def version_tags(
    config: FinetuneConfig,
    data: PreparedData,
    tokens: TokenizeResult,
    evaluation: EvalResult,
    exported: ExportResult,
    ladder: LadderResult,
    extras: list[StageOutput],
) -> dict[str, str]:
    """What a version records about itself: data identity (files read, their sha256, the label map), the training
    method (and an adapter's base), which split chose the checkpoint, parity, headline metrics, the scenario stages'
    tags."""
    test = evaluation.test_metrics or {}
    chooser = checkpoint_split(config.head_name, tokens.select_rows > 0)
    return {
        "scenario": config.scenario,
        "head": config.head_name,
        "data_hash": data.data_hash,
        "eval_hash": data.eval_hash,
        "tokenizer_hash": tokens.tokenizer_hash,
        "onnx_max_abs_diff": f"{exported.max_abs_diff:.3g}",
        "export.served_variant": ladder.served_variant,
        **({"export.int8_layout": ladder.int8_layout} if ladder.int8_layout else {}),
        "model_source": config.model.source,
        "adapter.method": config.adapter.method.value,
        **({"adapter.base": config.model.source} if config.adapter.method is TrainingMethod.LORA else {}),
        **(data.provenance() if isinstance(data, IngestResult) else {}),
        **({} if chooser is None else {"eval.selected_checkpoint": str(chooser == "eval").lower()}),
        **{f"eval.{k}": f"{evaluation.metrics[k]:.4f}" for k in evaluation.headline if k in evaluation.metrics},
        **{f"test.{k}": f"{test[k]:.4f}" for k in evaluation.headline if k in test},
        **{k: v for extra in extras for k, v in extra.tags.items()},
    }


@task(name="register")
def register_version(
    config: FinetuneConfig,
    data: PreparedData,
    tokens: TokenizeResult,
    evaluation: EvalResult,
    exported: ExportResult,
    ladder: LadderResult,
    extras: list[StageOutput],
    model_dir: str,
    run: RunInfo,
) -> RegisterResult:
    """Register the served model with its evidence and move the aliases the promotion gate allows."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri())
    head = HEADS.get(config.head_name)
    adapter = Path(run.run_dir) / ADAPTER_SUBDIR  # a LoRA run's adapter (its base.json names the base), kept too
    tags = version_tags(config, data, tokens, evaluation, exported, ladder, extras)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.set_tags(tags)
        for extra in extras:
            if extra.metrics:
                mlflow.log_metrics(extra.metrics)
    served = ServedModel(
        python_model=entry_file(config.head_name),
        artifacts={
            ONNX_ARTIFACT: ladder.served_path,
            TOKENIZER_ARTIFACT: str(Path(model_dir) / "tokenizer.json"),
            HF_SUBDIR: model_dir,
            **({ADAPTER_SUBDIR: str(adapter)} if adapter.is_dir() else {}),
            **{name: path for extra in extras for name, path in extra.served_artifacts.items()},
        },
        code_paths=served_code_paths(Path(run.run_dir) / "served_code"),
        pip_requirements=serving_requirements(ladder.served_path),
        input_example=input_example(Path(data.dataset_dir), head.text_columns),
    )
    request = eval_request(config, data, model_dir, ladder.served_path, run)
    evaluator = evaluator_for(config.head_name)

    def rescore(version: str) -> float | NotComparable:
        metric = evaluator.score_champion(f"models:/{config.model_name}/{version}", request)
        return NotComparable(reason="the champion's labels differ") if metric is None else metric

    result = publish_version(
        run.run_id,
        config.model_name,
        served,
        metric=evaluation.primary,
        primary_metric=config.primary_metric,
        eval_hash=data.eval_hash,
        margin=config.registration.promotion_margin,
        tags=tags,
        rescore=rescore,
        # Without a key of its own, a run registers at most one version: a resumed run gets the one it published.
        idempotency_key=config.registration.idempotency_key or f"mlflow-run:{run.run_id}",
    )
    create_markdown_artifact(
        key=f"{config.scenario}-registration",
        description="Registered model version and promotion decision",
        markdown=summary_markdown(result, config.primary_metric, run.tracking_uri_redacted),
    )
    return result
