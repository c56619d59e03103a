"""Serving a bi-encoder: an MLflow pyfunc that scores (query, item) text pairs on onnxruntime.

The registered version carries the exported sentence encoder (the run's ``onnx/model.onnx``), its
tokenizer.json, the Hugging Face checkpoint (for warm starts) and the ranking table of its run.
A pair's score is the scaled cosine the head was trained with: ``score_scale`` (from the graph's
metadata, written by the bi-encoder head's export) times the dot product of the two unit-length
embeddings. Loading it never imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from .classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from .encoder import SentenceEncoder
from .errors import ModelFilesError, ModelInputError
from .text_inputs import onnx_threads

RANKING_TABLE_ARTIFACT = "ranking_table"
PAIR_COLUMNS = ("query", "item")
SCORE_SCALE_KEY = "score_scale"  # ONNX metadata: the factor on the cosine, as in training


def score_scale(encoder: SentenceEncoder) -> float:
    """The ``score_scale`` metadata of ``encoder``'s graph: a finite number above zero."""
    raw = encoder.metadata.get(SCORE_SCALE_KEY)
    if raw is None:
        raise ModelFilesError(
            f"{encoder.onnx_path} has no {SCORE_SCALE_KEY!r} metadata (keys: {sorted(encoder.metadata)}); "
            "export the bi-encoder again: its head writes the scale its scores were trained with"
        )
    try:
        scale = float(raw)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ModelFilesError(f"{encoder.onnx_path} has {SCORE_SCALE_KEY} {raw!r}; expected a number above 0")
    return scale


class PairScorerPyfunc(PythonModel):
    """MLflow pyfunc: a frame with ``query`` and ``item`` text columns in; a ``score`` column out."""

    encoder: SentenceEncoder

    def load_context(self, context: Any) -> None:
        self.encoder = SentenceEncoder(
            context.artifacts[ONNX_ARTIFACT], context.artifacts[TOKENIZER_ARTIFACT], threads=onnx_threads(context)
        )
        score_scale(self.encoder)  # a graph without its scale fails at load, not at the first request

    @property
    def scale(self) -> float:
        """The factor on the cosine, from the encoder graph's ``score_scale`` metadata."""
        return score_scale(self.encoder)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of ``texts`` (each distinct text embedded once)."""
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        return self.encoder.encode([str(t) for t in unique])[inverse]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = [c for c in PAIR_COLUMNS if c not in model_input.columns]
        if missing:
            raise ModelInputError(
                f"missing column(s) {', '.join(missing)}; columns found: {', '.join(map(str, model_input.columns))}"
            )
        queries = self.embed(model_input["query"].astype(str).tolist())
        items = self.embed(model_input["item"].astype(str).tolist())
        return pd.DataFrame({"score": self.scale * (queries * items).sum(axis=1)})


def encoder_of(local_model_dir: Path, threads: int = 0) -> SentenceEncoder:
    """The sentence encoder inside a downloaded pair-scorer model folder (``threads`` > 0: its ONNX threads)."""
    from mlflow.models import Model

    artifacts = Model.load(str(local_model_dir)).flavors["python_function"]["artifacts"]
    return SentenceEncoder(
        local_model_dir / artifacts[ONNX_ARTIFACT]["path"],
        local_model_dir / artifacts[TOKENIZER_ARTIFACT]["path"],
        threads=threads,
    )
