"""Scoring raw text with an exported multi-label ONNX classifier, without torch.

One sigmoid per label; a label is predicted when its probability reaches its threshold. The
thresholds come from ``thresholds.json`` (tuned per label on the eval split by the evaluation and
shipped with the registered version as artifact ``thresholds``); without that file every label
uses 0.5. Output, one row per text: ``labels`` (the predicted label names, ``;``-joined in the
model's label order; empty for none) and ``prob_<label>`` per label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:  # MLflow is a core dependency, but the scorer itself must not need it.
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

from .classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT, OnnxTextClassifier
from .errors import ModelFilesError
from .text_inputs import onnx_threads, texts_from

THRESHOLDS_ARTIFACT = "thresholds"  # thresholds.json: labels, thresholds (tasks/classification/multilabel.py)
LABEL_SEPARATOR = ";"
DEFAULT_THRESHOLD = 0.5


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function in float64, without overflow for large logits of either sign."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


def read_thresholds(path: str | Path, labels: list[str]) -> np.ndarray:
    """The per-label thresholds in ``path`` (``{"labels": [...], "thresholds": [...]}``), in ``labels``' order.

    The file must name exactly the model's labels: thresholds of another label set are a ``ModelFilesError``."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        names, values = list(content["labels"]), [float(v) for v in content["thresholds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFilesError(f"{path}: not a thresholds file ({type(exc).__name__}: {exc})") from exc
    if sorted(names) != sorted(labels) or len(names) != len(values):
        raise ModelFilesError(f"{path}: thresholds for labels {names}, but the model predicts {labels}")
    by_name = dict(zip(names, values, strict=True))
    return np.array([by_name[label] for label in labels], dtype=np.float64)


class OnnxMultiLabelClassifier:
    """The ONNX graph's logits through a sigmoid per label, cut at each label's threshold."""

    def __init__(
        self,
        onnx_path: str | Path,
        tokenizer_path: str | Path,
        thresholds_path: str | Path | None = None,
        threads: int = 0,
    ) -> None:
        self.scorer = OnnxTextClassifier(onnx_path, tokenizer_path, threads)
        self.labels = self.scorer.labels
        self.thresholds = (
            np.full(len(self.labels), DEFAULT_THRESHOLD)
            if thresholds_path is None
            else read_thresholds(thresholds_path, self.labels)
        )

    def probabilities(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Sigmoid probability of every label for every text, shape (texts, labels)."""
        return sigmoid(self.scorer.logits(texts, batch_size))

    def predict(self, texts: list[str], batch_size: int = 64) -> pd.DataFrame:
        """One row per text: ``labels`` (``;``-joined names at or over their thresholds) and ``prob_<label>``."""
        probs = self.probabilities(texts, batch_size)
        chosen = probs >= self.thresholds
        frame = pd.DataFrame(
            {"labels": [LABEL_SEPARATOR.join(self.labels[i] for i in np.flatnonzero(row)) for row in chosen]}
        )
        for i, label in enumerate(self.labels):
            frame[f"prob_{label}"] = probs[:, i]
        return frame


class MultiLabelPyfunc(PythonModel):
    """MLflow pyfunc: raw text in; the predicted labels and every label's probability out (onnxruntime inside)."""

    def load_context(self, context: Any) -> None:
        self.scorer = OnnxMultiLabelClassifier(
            context.artifacts[ONNX_ARTIFACT],
            context.artifacts[TOKENIZER_ARTIFACT],
            context.artifacts.get(THRESHOLDS_ARTIFACT),  # none: every label at 0.5
            threads=onnx_threads(context),
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.scorer.predict(texts_from(model_input))
