"""Turning raw text into an ONNX graph's inputs with the model's own ``tokenizer.json`` (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def load_tokenizer(path: str | Path, max_length: int) -> Any:
    """A ``tokenizers`` tokenizer that truncates at ``max_length`` and does not pad (we pad per batch).

    Some ``tokenizer.json`` files carry fixed padding (all-MiniLM-L6-v2's pads to 128): it is turned off.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def padded_inputs(tokenizer: Any, texts: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    """The ONNX graph's int64 inputs for ``texts``, zero-padded to the longest text in the batch."""
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    batch = {name: np.zeros((len(texts), width), dtype=np.int64) for name in input_names}
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        batch["input_ids"][row, :n] = enc.ids
        batch["attention_mask"][row, :n] = enc.attention_mask
        if "token_type_ids" in batch:
            batch["token_type_ids"][row, :n] = enc.type_ids
    return batch


SERVED_MODEL_CONFIG = {"onnx_threads": 0}
"""The served pyfuncs' ``model_config`` as logged: MLflow lets a loader override only the keys logged with a model."""


def onnx_threads(context: Any) -> int:
    """Intra-op threads of a served model's ONNX sessions: ``onnx_threads`` in the ``model_config`` it was loaded
    with (``mlflow.pyfunc.load_model(uri, model_config={"onnx_threads": 1})``); 0: onnxruntime's default."""
    config = getattr(context, "model_config", None) or {}
    return int(config.get("onnx_threads", 0))


def texts_from(model_input: Any) -> list[str]:
    """Accept a list of strings, a Series, or a DataFrame with a ``text`` column (or one column)."""
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return model_input[column].astype(str).tolist()
    if isinstance(model_input, pd.Series):
        return model_input.astype(str).tolist()
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]
