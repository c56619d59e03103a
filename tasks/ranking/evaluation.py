"""The bi-encoder head's evaluation: rank each validation (and test) target among its sampled candidates with the
exported encoder, exactly as it is served, and report HR@10, NDCG@10 and MRR.

The score matrices are kept in the report folder (``model_scores.npz``), so the recommendation
scenario's comparison stage (``tasks.ranking.comparison``) blends them with the baselines
without embedding again. The champion is re-scored with its own encoder on the same candidates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from finetune_flows.tasks.core.evaluating import EvalRequest, EvalResult
from finetune_flows.tasks.ranking.metrics import score_metrics
from finetune_flows.tasks.serving.encoder import SentenceEncoder

logger = logging.getLogger(__name__)

SPLITS = ("validation", "test")
SCORES_FILE = "model_scores.npz"


def encoder_scores(
    encoder: SentenceEncoder, items: pd.DataFrame, frames: dict[str, pd.DataFrame], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Per frame, (users, candidates) cosine similarities of each profile with its candidates' texts.

    Every candidate item is embedded once, whichever frames it appears in.
    """
    texts = items.set_index("item")["text"]
    needed = pd.unique(np.concatenate([np.asarray(c) for f in frames.values() for c in f["candidates"]]))
    vectors = encoder.encode([texts[i] for i in needed], batch_size=batch_size)
    row_of = {item: index for index, item in enumerate(needed)}
    scores = {}
    for name, frame in frames.items():
        profiles = encoder.encode(list(frame["profile"]), batch_size=batch_size)
        candidate_rows = np.stack([[row_of[i] for i in c] for c in frame["candidates"]])
        scores[name] = np.einsum("ud,ucd->uc", profiles, vectors[candidate_rows])
    return scores


def split_frames(dataset_dir: Path) -> dict[str, pd.DataFrame]:
    """Each split's users, profiles and candidates (target first) from a prepared ranking dataset."""
    return {name: pd.read_parquet(dataset_dir / f"{name}.parquet") for name in SPLITS}


class RankingEvaluator:
    """HR@10, NDCG@10 and MRR of the exported encoder on validation (promotion) and test (reported only)."""

    headline: ClassVar[tuple[str, ...]] = ("hr_at_10", "ndcg_at_10", "mrr")

    def training_metrics(self, head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
        """Nothing: the bi-encoder trains without evaluating (in-batch negatives; the last model is kept)."""
        return {}

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Score every split's candidates; keep the score matrices for the scenario's comparison stage."""
        dataset = Path(request.dataset_dir)
        encoder = SentenceEncoder(
            request.onnx_path, Path(request.model_dir) / "tokenizer.json", max_length=request.max_length
        )
        scores = encoder_scores(encoder, pd.read_parquet(dataset / "items.parquet"), split_frames(dataset))
        report = Path(request.report_dir)
        report.mkdir(parents=True, exist_ok=True)
        np.savez(report / SCORES_FILE, validation=scores["validation"], test=scores["test"])
        metrics = {name: score_metrics(matrix) for name, matrix in scores.items()}
        logger.info("ranking: validation %s; test %s", metrics["validation"], metrics["test"])
        return EvalResult(
            metrics=metrics["validation"],
            test_metrics=metrics["test"],
            primary_metric=request.primary_metric,
            report_dir=str(report),
            headline=list(self.headline),
        )

    def score_graph(self, onnx_path: str, request: EvalRequest) -> float:
        """The graph as encoder on the validation candidates."""
        dataset = Path(request.dataset_dir)
        encoder = SentenceEncoder(onnx_path, Path(request.model_dir) / "tokenizer.json", max_length=request.max_length)
        frames = {"validation": pd.read_parquet(dataset / "validation.parquet")}
        scores = encoder_scores(encoder, pd.read_parquet(dataset / "items.parquet"), frames)
        return score_metrics(scores["validation"])[request.primary_metric]

    def score_champion(self, model_uri: str, request: EvalRequest) -> float | None:
        """The champion's own encoder on this split's validation candidates."""
        import mlflow

        from finetune_flows.tasks.serving.pair_scorer import encoder_of

        local = Path(mlflow.artifacts.download_artifacts(model_uri))
        dataset = Path(request.dataset_dir)
        frames = {"validation": pd.read_parquet(dataset / "validation.parquet")}
        scores = encoder_scores(encoder_of(local), pd.read_parquet(dataset / "items.parquet"), frames)
        return score_metrics(scores["validation"])[request.primary_metric]
