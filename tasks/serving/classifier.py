"""Scoring raw text with an exported ONNX classifier, without torch.

``OnnxTextClassifier`` needs only ``tokenizers``, ``onnxruntime`` and numpy, so monitoring and
serving processes stay light. ``TextClassifierPyfunc`` wraps it as the MLflow pyfunc that a
registered model version loads: text in, label and class probabilities out.
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

from .runtime import open_session
from .text_inputs import load_tokenizer, onnx_threads, padded_inputs, texts_from

ONNX_ARTIFACT = "onnx_model"
TOKENIZER_ARTIFACT = "tokenizer_json"
TOPIC_ARTIFACT = "topic_encoder"  # a folder: encoder.onnx, tokenizer.json, topics.json
HANDOFF_ARTIFACT = "handoff"  # handoff.json: temperature, threshold, label (tasks/classification/handoff.py)


class OnnxTextClassifier:
    """Tokenize with the model's own ``tokenizer.json`` and run the ONNX graph on onnxruntime."""

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path, threads: int = 0) -> None:
        self.session = open_session(onnx_path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        id2label = json.loads(meta["id2label"])
        self.labels: list[str] = [id2label[key] for key in sorted(id2label, key=int)]
        self.max_length = int(meta["max_length"])
        self.tokenizer_hash = meta.get("tokenizer_hash", "")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = load_tokenizer(tokenizer_path, self.max_length)

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids for ``texts``, padded to the longest in the batch."""
        return padded_inputs(self.tokenizer, texts, self.input_names)

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits, computed in batches of similar length (results in input order)."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.session.run(["logits"], self.encode([texts[i] for i in idx]))[0]
        return out

    def predict(self, texts: list[str], batch_size: int = 64, handoff: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per text: ``label``, ``score`` (its probability) and ``prob_<label>`` per class.

        With a hand-off policy (``handoff.json``: temperature, threshold, label) the probabilities are
        softmax(logits / temperature), ``intent`` is the most likely class and ``label`` is the policy's label
        (``handoff``) where ``score`` is below the threshold."""
        temperature = float(handoff["temperature"]) if handoff else 1.0
        logits = self.logits(texts, batch_size).astype(np.float64) / temperature
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = exp / exp.sum(axis=-1, keepdims=True)
        best = probs.argmax(axis=-1)
        frame = pd.DataFrame({"label": [self.labels[i] for i in best], "score": probs.max(axis=-1)})
        if handoff:
            frame.insert(1, "intent", frame["label"])
            frame.loc[frame["score"] < float(handoff["threshold"]), "label"] = str(handoff.get("label", "handoff"))
        for i, label in enumerate(self.labels):
            frame[f"prob_{label}"] = probs[:, i]
        return frame


class TextClassifierPyfunc(PythonModel):
    """MLflow pyfunc: raw text in; label, score and class probabilities out (onnxruntime inside)."""

    def load_context(self, context: Any) -> None:
        threads = onnx_threads(context)
        self.scorer = OnnxTextClassifier(
            context.artifacts[ONNX_ARTIFACT], context.artifacts[TOKENIZER_ARTIFACT], threads=threads
        )
        self.handoff: dict[str, Any] | None = None
        if HANDOFF_ARTIFACT in context.artifacts:  # an intent model that hands unsure messages to a person
            self.handoff = json.loads(Path(context.artifacts[HANDOFF_ARTIFACT]).read_text(encoding="utf-8"))
        self.topics: Any = None
        if TOPIC_ARTIFACT in context.artifacts:
            from .topics import load_topic_assigner  # pydantic only for models with topics

            self.topics = load_topic_assigner(Path(context.artifacts[TOPIC_ARTIFACT]), threads)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = texts_from(model_input)
        scored = self.scorer.predict(texts, handoff=self.handoff)
        if self.topics is not None:
            scored["topic"] = self.topics.assign(texts)
        return scored
