"""Top-k search for recommend: exact below a catalogue size, a recall-gated faiss index above, and the
item-embedding cache keyed by text and model version (tasks.ranking.neighbours, ann_index, item_vectors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_flows.tasks.export.model_export import export_sentence_encoder
from finetune_flows.tasks.ranking.ann_index import SearchOptions, SearchReport, build_neighbours
from finetune_flows.tasks.ranking.item_vectors import embeddings_folder, item_vectors, model_key
from finetune_flows.tasks.ranking.neighbours import Neighbours, exact_search
from finetune_flows.tasks.ranking.recommending import RecommendConfig, recommend_for
from finetune_flows.tasks.serving.encoder import SentenceEncoder


def unit_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int, exclude: Sequence[int]) -> list[int]:
    order = [int(i) for i in np.argsort(-(vectors @ query), kind="stable") if i not in set(exclude)]
    return order[:k]


@pytest.fixture(scope="module")
def catalogue() -> np.ndarray:
    """60k random unit vectors in 32 dimensions: above the default ANN threshold of 50k."""
    return unit_vectors(60_000, 32, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return unit_vectors(200, 32, seed=1)


@pytest.fixture(scope="module")
def hnsw(catalogue: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> tuple[Neighbours, SearchReport, Path]:
    """The default index over the catalogue, built once (in a cache folder) for the tests below."""
    cache = tmp_path_factory.mktemp("index")
    return *build_neighbours(catalogue, SearchOptions(), cache, queries=unit_vectors(300, 32, seed=4)), cache


def test_exact_search_equals_brute_force_and_skips_excluded_items() -> None:
    vectors, queries = unit_vectors(500, 16, seed=2), unit_vectors(30, 16, seed=3)
    exclude = [list(range(q, 500, 7)) for q in range(30)]

    found = exact_search(vectors, queries, 10, exclude, scale=20.0, batch=8)

    for q, (rows, scores) in enumerate(found):
        assert rows.tolist() == brute_force(vectors, queries[q], 10, exclude[q])
        np.testing.assert_allclose(scores, 20.0 * vectors[rows] @ queries[q], rtol=1e-5)
    # fewer items left than k: all of them, best first
    ((rows, _),) = exact_search(vectors[:5], queries[:1], 10, [[0, 1]])
    assert sorted(rows.tolist()) == [2, 3, 4]


def test_a_small_catalogue_is_searched_exactly(catalogue: np.ndarray) -> None:
    neighbours, report = build_neighbours(catalogue[:1000], SearchOptions())

    assert neighbours.index is None and report.kind == "exact" and report.recall_at_10 is None
    assert report.note == "1000 items < ann_min_items 50000: exact search"


def test_hnsw_reaches_the_recall_gate_and_is_reused(
    catalogue: np.ndarray, queries: np.ndarray, hnsw: tuple[Neighbours, SearchReport, Path]
) -> None:
    neighbours, report, cache = hnsw

    assert report.kind == "hnsw" and neighbours.index is not None
    assert report.recall_at_10 is not None and report.recall_at_10 >= 0.95, report
    assert (report.queries, report.real_queries, report.params["M"]) == (1000, 300, 32)
    assert report.item_recall_at_10 is not None and report.query_recall_at_10 is not None
    assert report.recall_at_10 == min(report.item_recall_at_10, report.query_recall_at_10)
    assert report.note.startswith(f"hnsw recall@10 {report.recall_at_10:.4f} >= 0.95 at efSearch ")
    # measured again on queries the gate never saw (gated on seed 4, these are seed 1)
    ann = neighbours.search(queries, 10, [[]] * len(queries))
    exact = exact_search(catalogue, queries, 10, [[]] * len(queries))
    recall = np.mean([len(np.intersect1d(a, e)) / 10 for (a, _), (e, _) in zip(ann, exact, strict=True)])
    assert recall >= 0.9, recall

    again, second = build_neighbours(catalogue, SearchOptions(), cache)
    assert second.reused and second.params == report.params and second.recall_at_10 == report.recall_at_10
    assert [r.tolist() for r, _ in again.search(queries, 10, [[]] * 200)] == [a.tolist() for a, _ in ann]


def test_ivf_reaches_the_recall_gate(catalogue: np.ndarray) -> None:
    _, report = build_neighbours(catalogue, SearchOptions(index="ivf", recall_queries=200))

    assert report.kind == "ivf" and report.recall_at_10 is not None and report.recall_at_10 >= 0.95, report
    assert report.params["nlist"] == int(4 * np.sqrt(60_000))


def test_an_index_that_misses_the_gate_is_not_used(catalogue: np.ndarray, queries: np.ndarray, tmp_path: Path) -> None:
    catalogue = catalogue[:20_000]
    options = SearchOptions(ann_min_items=10_000, min_recall=0.999, max_ef_search=4, recall_queries=200)

    neighbours, report = build_neighbours(catalogue, options, tmp_path)

    assert report.kind == "exact" and neighbours.index is None
    assert report.recall_at_10 is not None and report.recall_at_10 < 0.999
    assert report.params["efSearch"] == 4
    assert report.note.endswith("< 0.999 at efSearch 4 (the budget's end): the index is not used, exact search instead")
    found = neighbours.search(queries[:5], 10, [[]] * 5)
    assert [r.tolist() for r, _ in found] == [r.tolist() for r, _ in exact_search(catalogue, queries[:5], 10, [[]] * 5)]
    # the decision is kept with the catalogue: a rerun does not rebuild and stays exact
    _, again = build_neighbours(catalogue, options, tmp_path)
    assert again.reused and again.kind == "exact"


def test_ann_search_skips_excluded_items_even_when_they_are_the_nearest(
    catalogue: np.ndarray, queries: np.ndarray, hnsw: tuple[Neighbours, SearchReport, Path]
) -> None:
    neighbours, report, _ = hnsw
    assert report.kind == "hnsw"
    nearest = [rows.tolist() for rows, _ in exact_search(catalogue, queries[:40], 3000, [[]] * 40)]
    # each query's 300 nearest items excluded; the last 5 queries lose their 3000 nearest (answered exactly)
    exclude = [rows[:300] for rows in nearest[:35]] + nearest[35:]

    found = neighbours.search(queries[:40], 10, exclude, scale=20.0)
    truth = exact_search(catalogue, queries[:40], 10, exclude, scale=20.0)

    hits = 0
    for (rows, scores), banned, (want, _) in zip(found, exclude, truth, strict=True):
        assert len(rows) == 10 and not set(rows.tolist()) & set(banned)
        assert np.all(np.diff(scores) <= 0)
        hits += len(np.intersect1d(rows, want))
    assert hits / 400 >= 0.9, hits
    assert [r.tolist() for r, _ in found[35:]] == [w.tolist() for w, _ in truth[35:]]


# -- the embedding cache, with a real (tiny) encoder ----------------------------------------------------
class CountingEncoder(SentenceEncoder):
    """The real encoder, counting the texts it is asked to embed."""

    embedded = 0

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.embedded += len(texts)
        return super().encode(texts, batch_size)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_sentence_encoder(tiny_model_dir, tmp_path_factory.mktemp("encoder") / "tiny.onnx", max_length=32)


@pytest.fixture
def encoder(tiny_onnx: Path, tiny_model_dir: Path) -> CountingEncoder:
    return CountingEncoder(tiny_onnx, tiny_model_dir / "tokenizer.json")


TEXTS = [
    "Alien (1979). Horror, Sci-Fi",
    "Heat (1995). Action, Crime",
    "Up (2009). Animation",
    "Heat (1995). Action, Crime",
]


def test_only_new_texts_are_embedded_and_versions_do_not_share(encoder: CountingEncoder, state_dir: Path) -> None:
    v1 = embeddings_folder("models:/recommendation/1")
    assert v1 == state_dir.resolve() / "embeddings" / "recommendation-v1" and model_key("base model") == "base_model"

    first, stats = item_vectors(encoder, TEXTS, v1)
    assert (stats.texts, stats.unique, stats.cached, stats.embedded, encoder.embedded) == (4, 3, 0, 3, 3)
    np.testing.assert_allclose(first, SentenceEncoder.encode(encoder, TEXTS), atol=1e-6)

    grown = [*TEXTS, "Brazil (1985). Comedy, Sci-Fi"]
    second, stats = item_vectors(encoder, grown, v1)
    assert (stats.cached, stats.embedded, encoder.embedded) == (3, 1, 4)  # only the new title
    np.testing.assert_array_equal(second[:4], first)

    _, stats = item_vectors(encoder, grown[::-1], v1)
    assert (stats.cached, stats.embedded, encoder.embedded) == (4, 0, 4)

    _, stats = item_vectors(encoder, grown, embeddings_folder("models:/recommendation/2"))
    assert (stats.cached, stats.embedded, encoder.embedded) == (0, 4, 8)  # another version: nothing reused


def test_a_different_encoder_in_the_same_folder_starts_the_cache_afresh(
    encoder: CountingEncoder, tiny_model_dir: Path, tmp_path: Path
) -> None:
    item_vectors(encoder, TEXTS, tmp_path)
    shorter = CountingEncoder(encoder.onnx_path, tiny_model_dir / "tokenizer.json", max_length=8)

    _, stats = item_vectors(shorter, TEXTS, tmp_path)

    assert (stats.cached, stats.embedded) == (0, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npz"]  # no partial file left behind


def test_recommend_through_an_index_gives_the_exact_lists(
    encoder: CountingEncoder, state_dir: Path, log_folder: Path, tmp_path: Path
) -> None:
    users = [f"u{i}" for i in range(10)]
    exact = recommend_for(
        RecommendConfig(users=users, k=5, output_path=str(tmp_path / "exact.parquet")),
        log_folder,
        encoder,
        "models:/r/1",
    )
    ann = recommend_for(
        RecommendConfig(users=users, k=5, ann_min_items=10, min_recall=1.0, output_path=str(tmp_path / "ann.parquet")),
        log_folder,
        encoder,
        "models:/r/1",
    )

    assert exact.search.kind == "exact" and exact.embedding.embedded == 80
    assert ann.search.kind == "hnsw" and ann.search.recall_at_10 == 1.0 and ann.embedding.cached == 80
    lists = pd.read_parquet(tmp_path / "ann.parquet")
    pd.testing.assert_frame_equal(
        lists.drop(columns="score"), pd.read_parquet(tmp_path / "exact.parquet").drop(columns="score")
    )
    rated = pd.read_csv(log_folder / "interactions.csv", dtype=str)
    assert not set(zip(lists["user"], lists["item"], strict=True)) & set(zip(rated["user"], rated["item"], strict=True))
