"""Sentence embeddings from an exported ONNX encoder on onnxruntime and ``tokenizers``, without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ModelFilesError
from .runtime import open_session
from .text_inputs import load_tokenizer, padded_inputs

DEFAULT_MAX_LENGTH = 128
EMBEDDING_OUTPUT = "embedding"


class SentenceEncoder:
    """L2-normalised sentence embeddings from an exported ONNX encoder (``tokenizers`` + onnxruntime)."""

    def __init__(
        self, onnx_path: str | Path, tokenizer_json_path: str | Path, max_length: int | None = None, threads: int = 0
    ) -> None:
        """``max_length`` None: the graph's ``max_length`` metadata, else ``DEFAULT_MAX_LENGTH`` tokens."""
        self.onnx_path = Path(onnx_path)
        self.session = open_session(onnx_path, threads)
        outputs = {o.name: o for o in self.session.get_outputs()}
        if EMBEDDING_OUTPUT not in outputs:
            raise ModelFilesError(
                f"{onnx_path} has no output {EMBEDDING_OUTPUT!r} (outputs: {sorted(outputs)}); "
                "export sentence encoders with tasks.export.model_export.export_sentence_encoder"
            )
        width = outputs[EMBEDDING_OUTPUT].shape[-1]
        self.dim = width if isinstance(width, int) else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.max_length = max_length or int(self.metadata.get("max_length", DEFAULT_MAX_LENGTH))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = load_tokenizer(tokenizer_json_path, self.max_length)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for ``texts``, padded to the longest text in the batch."""
        return padded_inputs(self.tokenizer, texts, self.input_names)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """One unit-length row per text, in input order; batches group texts of similar length."""
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            rows = self.session.run([EMBEDDING_OUTPUT], self.tokenize([texts[i] for i in idx]))[0]
            if out is None:
                out = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
            out[idx] = rows
        assert out is not None
        return out
