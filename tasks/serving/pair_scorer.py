"""Serving a bi-encoder: an MLflow pyfunc that scores (query, item) text pairs on onnxruntime.

The registered version carries the exported sentence encoder (``encoder.onnx``), its
tokenizer.json, the Hugging Face checkpoint (for warm starts) and the ranking table of its run.
Loading it never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from finetune_flows.plugins import DataError
from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from finetune_flows.tasks.serving.encoder import SentenceEncoder

RANKING_TABLE_ARTIFACT = "ranking_table"
PAIR_COLUMNS = ("query", "item")


class PairScorerPyfunc(PythonModel):
    """MLflow pyfunc: a frame with ``query`` and ``item`` text columns in; a ``score`` column out."""

    scale: float = 20.0

    def load_context(self, context: Any) -> None:
        self.encoder = SentenceEncoder(context.artifacts[ONNX_ARTIFACT], context.artifacts[TOKENIZER_ARTIFACT])

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of ``texts`` (each distinct text embedded once)."""
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        return self.encoder.encode([str(t) for t in unique])[inverse]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = [c for c in PAIR_COLUMNS if c not in model_input.columns]
        if missing:
            raise DataError(
                f"missing column(s) {', '.join(missing)}", hint=f"Columns found: {', '.join(model_input.columns)}"
            )
        queries = self.embed(model_input["query"].astype(str).tolist())
        items = self.embed(model_input["item"].astype(str).tolist())
        return pd.DataFrame({"score": self.scale * (queries * items).sum(axis=1)})


def encoder_of(local_model_dir: Path) -> SentenceEncoder:
    """The sentence encoder inside a downloaded pair-scorer model folder."""
    from mlflow.models import Model

    artifacts = Model.load(str(local_model_dir)).flavors["python_function"]["artifacts"]
    return SentenceEncoder(
        local_model_dir / artifacts[ONNX_ARTIFACT]["path"], local_model_dir / artifacts[TOKENIZER_ARTIFACT]["path"]
    )
