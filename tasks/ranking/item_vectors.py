"""Item embeddings cached by content hash, one cache per model version.

The cache of a model lives in ``<state>/embeddings/<name>-v<version>/vectors.npz``: the sha256
digests of the texts embedded so far (sorted) and their vectors, plus the fingerprint of the
encoder that made them (its ONNX file and token limit). A changed catalogue embeds only the texts
the cache lacks; another model version has another folder and never sees these vectors; an encoder
whose fingerprint differs from the stored one (a registry rebuilt under the same version number)
starts the cache afresh. The file is replaced atomically (written under a temporary name, then
``os.replace``), so a killed run leaves the previous cache intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import file_sha256
from finetune_flows.tasks.serving.encoder import SentenceEncoder

logger = logging.getLogger(__name__)

CACHE_FILE = "vectors.npz"
DIGEST = np.dtype("S32")


class EmbeddingStats(BaseModel):
    """How a catalogue's vectors were obtained."""

    model_config = ConfigDict(frozen=True)

    folder: str
    texts: int
    unique: int
    cached: int
    embedded: int
    seconds: float


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """sha256 of each text (UTF-8) as 32 raw bytes: the cache key of an item."""
    return np.array([hashlib.sha256(t.encode()).digest() for t in texts], dtype=DIGEST)


def model_key(model_uri: str) -> str:
    """``models:/<name>/<version>`` -> ``<name>-v<version>``; any other id -> a file-safe form of it."""
    if model_uri.startswith("models:/") and model_uri.count("/") >= 2:
        name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-v{version}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_uri).strip("_") or "model"


def embeddings_folder(model_uri: str) -> Path:
    """``<state>/embeddings/<model key>``: the cache (and indexes) of one model version."""
    return get_settings().state / "embeddings" / model_key(model_uri)


def encoder_fingerprint(encoder: SentenceEncoder) -> str:
    """What makes two encoders' vectors interchangeable: the ONNX file's sha256 and the token limit."""
    return f"{file_sha256(encoder.onnx_path)}:{encoder.max_length}"


def load_cache(path: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted digests, vectors) stored at ``path`` by the encoder ``fingerprint``; empty when none."""
    if not path.is_file():
        return np.zeros(0, dtype=DIGEST), None
    with np.load(path) as stored:
        if str(stored["encoder"]) != fingerprint:
            logger.warning("embedding cache %s was made by another encoder; starting it afresh", path)
            return np.zeros(0, dtype=DIGEST), None
        return stored["digests"], stored["vectors"]


def save_cache(path: Path, digests: np.ndarray, vectors: np.ndarray, fingerprint: str) -> None:
    """Write the cache under a temporary name, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
    with partial.open("wb") as fh:
        np.savez(fh, digests=digests, vectors=vectors, encoder=np.array(fingerprint))
    os.replace(partial, path)


def lookup(store: np.ndarray, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, row in ``store``) of each digest; ``store`` is sorted."""
    rows = np.searchsorted(store, digests)
    clipped = np.minimum(rows, max(len(store) - 1, 0))
    found = (rows < len(store)) & (store[clipped] == digests) if len(store) else np.zeros(len(digests), dtype=bool)
    return found, clipped


def item_vectors(
    encoder: SentenceEncoder, texts: Sequence[str], folder: Path, batch_size: int = 64
) -> tuple[np.ndarray, EmbeddingStats]:
    """One unit vector per text, in order: cached ones read back, the rest embedded and added to the cache."""
    started = time.perf_counter()
    digests = text_digests(texts)
    unique, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    path = folder / CACHE_FILE
    fingerprint = encoder_fingerprint(encoder)
    store, stored = load_cache(path, fingerprint)
    found, rows = lookup(store, unique)
    missing = np.flatnonzero(~found)
    missing = missing[np.argsort(first[missing], kind="stable")]  # catalogue order: the batches of a cold run
    fresh = encoder.encode([texts[int(first[i])] for i in missing], batch_size=batch_size)
    width = fresh.shape[1] if len(missing) else (stored.shape[1] if stored is not None else 0)
    vectors = np.zeros((len(unique), width), dtype=np.float32)
    if stored is not None and found.any():
        vectors[found] = stored[rows[found]]
    vectors[missing] = fresh
    if len(missing):
        merged = np.concatenate([store, unique[missing]])
        merged_vectors = fresh if stored is None else np.concatenate([stored, fresh])
        order = np.argsort(merged, kind="stable")
        save_cache(path, merged[order], merged_vectors[order], fingerprint)
    stats = EmbeddingStats(
        folder=str(folder),
        texts=len(texts),
        unique=len(unique),
        cached=int(found.sum()),
        embedded=len(missing),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "item vectors: %d texts (%d unique), %d from the cache, %d embedded in %.1f s (%s)",
        stats.texts,
        stats.unique,
        stats.cached,
        stats.embedded,
        stats.seconds,
        folder,
    )
    return vectors[inverse.reshape(-1)], stats
