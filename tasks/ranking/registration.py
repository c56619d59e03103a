"""Stage 5 of the recommender: register the bi-encoder and gate promotion on validation NDCG@10.

The version is a pair-scoring pyfunc (``tasks.serving.pair_scorer``) carrying the parity-checked ONNX
encoder, the Hugging Face checkpoint and the run's ranking table; its tags hold the model's
validation and test metrics, the hybrid weight and the data hash. Promotion goes through
``tasks.publishing.promotion`` (inside the model's lock; a champion measured on another split is re-scored
with its own encoder on this run's validation candidates). A failure after registering deletes
the new version, so the registry is left as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact

from finetune_flows.plugins import SCENARIOS, PromotionError
from finetune_flows.tasks.core.model_source import HF_SUBDIR
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.publishing.promotion import (
    CHALLENGER,
    CHAMPION,
    Candidate,
    metric_tag,
    promote_locked,
    promotion_lock,
)
from finetune_flows.tasks.publishing.registration import RegisterResult
from finetune_flows.tasks.ranking.config import RecommenderConfig
from finetune_flows.tasks.ranking.dataset import RankingData
from finetune_flows.tasks.ranking.evaluation import HYBRID, RankingEvalResult, encoder_scores
from finetune_flows.tasks.ranking.metrics import score_metrics
from finetune_flows.tasks.ranking.pair_training import PairTrainResult
from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from finetune_flows.tasks.serving.pair_scorer import RANKING_TABLE_ARTIFACT, encoder_of

logger = logging.getLogger(__name__)

SERVING_DIR = Path(__file__).resolve().parents[1] / "serving"


def champion_ndcg(model_name: str, version: str, data: RankingData, primary_metric: str) -> tuple[float | None, str]:
    """``version``'s primary metric with its own encoder on this split's validation candidates."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}"))
    frames = {"validation": data.frame("validation")}
    scores = encoder_scores(encoder_of(local), data.frame("items"), frames)["validation"]
    return score_metrics(scores)[primary_metric], "re-scored on the same validation candidates"


def hybrid_tags(table_csv: Path) -> dict[str, str]:
    """``hybrid.eval.ndcg_at_10``-style tags from the ranking table (the blend is not registered itself)."""
    table = pd.read_csv(table_csv)
    rows = table[table["method"] == HYBRID]
    return {
        f"hybrid.{'eval' if row.split == 'validation' else 'test'}.{metric}": f"{getattr(row, metric):.4f}"
        for row in rows.itertuples()
        for metric in ("hr_at_10", "ndcg_at_10", "mrr")
    }


def register_scorer(
    trained: PairTrainResult,
    onnx_path: str,
    evaluation: RankingEvalResult,
    data: RankingData,
    config: RecommenderConfig,
    run: RunInfo,
) -> RegisterResult:
    """Log and register the pair scorer, tag its evidence, and run the promotion gate under the lock."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    client = mlflow.MlflowClient()
    name, primary = config.model_name, SCENARIOS.get(config.scenario).primary_metric
    model_dir = Path(trained.model_dir)
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_DIR / "pair_model.py"),
            artifacts={
                ONNX_ARTIFACT: onnx_path,
                TOKENIZER_ARTIFACT: str(model_dir / "tokenizer.json"),
                HF_SUBDIR: str(model_dir),
                RANKING_TABLE_ARTIFACT: evaluation.table_csv,
            },
            code_paths=[str(SERVING_DIR.parent)],
            pip_requirements=["onnxruntime", "tokenizers", "pandas", "numpy", "mlflow"],
        )
    split_hash = f"{data.data_hash}:{Path(data.dataset_dir).name}"  # the data and the split options
    tags = {
        "scenario": config.scenario,
        "head": config.head_name,
        "data_hash": data.data_hash,
        "eval_hash": split_hash,
        metric_tag(primary): f"{evaluation.primary:.6f}",
        "hybrid_weight": f"{evaluation.hybrid_weight:g}",
        **hybrid_tags(Path(evaluation.table_csv)),
        **{f"eval.{k}": f"{v:.4f}" for k, v in evaluation.metrics.items()},
        **{f"test.{k}": f"{v:.4f}" for k, v in evaluation.test_metrics.items()},
    }
    with promotion_lock(name):
        version = str(mlflow.register_model(info.model_uri, name).version)
        try:
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            client.set_registered_model_alias(name, CHALLENGER, version)
            candidate = Candidate(
                model_name=name,
                version=version,
                primary_metric=primary,
                metric=evaluation.primary,
                eval_hash=split_hash,
                margin=config.registration.promotion_margin,
            )
            decision = promote_locked(client, candidate, lambda v: champion_ndcg(name, v, data, primary))
        except Exception as exc:
            champion_now = client.get_registered_model(name).aliases.get(CHAMPION)
            client.delete_model_version(name, version)
            raise PromotionError(
                f"registering {name} v{version} failed and was rolled back "
                f"(champion stays {champion_now or 'unset'}): {exc}"
            ) from exc
    return RegisterResult(
        model_name=name,
        version=version,
        aliases=sorted(client.get_model_version(name, version).aliases),
        promoted=decision.promoted,
        decision=decision.decision,
        challenger_metric=evaluation.primary,
        champion_version=decision.champion_version,
        champion_metric=decision.champion_metric,
        run_id=run.run_id,
        model_uri=f"models:/{name}/{version}",
    )


@task(name="register-recommender")
def register_recommender(
    trained: PairTrainResult,
    onnx_path: str,
    evaluation: RankingEvalResult,
    data: RankingData,
    config: RecommenderConfig,
    run: RunInfo,
) -> RegisterResult:
    """Register the scorer with its ranking table; champion moves only on better validation NDCG@10."""
    result = register_scorer(trained, onnx_path, evaluation, data, config, run)
    create_markdown_artifact(
        key=f"{config.scenario}-registration",
        description="Registered model version, promotion decision and the ranking table",
        markdown=(
            f"### {result.model_name} version {result.version}\n\naliases: {', '.join(result.aliases) or 'none'}\n\n"
            f"decision: {result.decision}\n\nMLflow: `{result.model_uri}` (run `{result.run_id}`)\n\n"
            + Path(evaluation.table_markdown).read_text(encoding="utf-8")
        ),
    )
    logger.info("register: %s v%s, aliases %s; %s", result.model_name, result.version, result.aliases, result.decision)
    return result
