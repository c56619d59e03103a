"""Serving an adapted encoder (flow ``pretrain``): an MLflow pyfunc that embeds texts on onnxruntime.

The registered version carries the exported sentence encoder (mean pooling and L2 norm inside the
graph), its tokenizer.json and the Hugging Face checkpoint (``hf_model``), which fine-tuning warm-starts
from with ``model.source=models:/<name>@<alias>``. Loading it never imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from .classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from .encoder import SentenceEncoder
from .text_inputs import onnx_threads, texts_from


class SentenceEmbeddingPyfunc(PythonModel):
    """MLflow pyfunc: texts in; one unit-length embedding row per text out."""

    encoder: SentenceEncoder

    def load_context(self, context: Any) -> None:
        self.encoder = SentenceEncoder(
            context.artifacts[ONNX_ARTIFACT], context.artifacts[TOKENIZER_ARTIFACT], threads=onnx_threads(context)
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.encoder.encode(texts_from(model_input))
