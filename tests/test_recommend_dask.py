"""``recommend`` on Dask (tasks.ranking.partitioned): users in partitions on two worker processes give the
lists of the single-process path (exact search and a recall-gated HNSW index), a rerun skips the parts it
wrote, and a run killed mid-way (flow process and workers) resumes where it stopped.

The recommender is a tiny exported sentence encoder registered as a pair-scorer pyfunc (no training);
the Dask cluster is a local one of two worker processes reached by address, started after the state
folder is set so the workers see the same MLflow store and caches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from prefect.states import Failed
from pydantic import ValidationError

from finetune_flows.flows.cli.main import build_parser
from finetune_flows.flows.cli.score_command import engine_values
from finetune_flows.flows.recommend import recommend
from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.batch.engine import EngineConfig, local_cluster_kwargs
from finetune_flows.tasks.batch.runner import MANIFEST
from finetune_flows.tasks.ranking.recommending import (
    RecommendConfig,
    RecommendResult,
    fetch_scorer,
    retry_unless_config_error,
)
from tests.conftest import state_folder

LISTS = ["user", "rank", "item", "score", "text"]


@pytest.fixture(scope="module")
def recommender(prefect_harness: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state folder whose MLflow store holds ``recommendation`` v1 (champion): the tiny encoder, untrained."""
    from finetune_flows.tasks.export.model_export import export_sentence_encoder
    from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
    from finetune_flows.tasks.serving.pair_scorer import PairScorerPyfunc

    state = tmp_path_factory.mktemp("recommend-state")
    with state_folder(state) as settings:
        onnx = export_sentence_encoder(tiny_model_dir, state / "encoder.onnx", max_length=32)
        experiment = mlflow.MlflowClient().create_experiment(
            "recommend-test", artifact_location=f"{settings.artifact_root}/recommend"
        )
        mlflow.set_experiment(experiment_id=experiment)
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(
                name="model", python_model=PairScorerPyfunc(), pip_requirements=["mlflow"],
                artifacts={ONNX_ARTIFACT: str(onnx), TOKENIZER_ARTIFACT: str(tiny_model_dir / "tokenizer.json")},
            )  # fmt: skip
        version = mlflow.register_model(info.model_uri, "recommendation").version
        mlflow.MlflowClient().set_registered_model_alias("recommendation", "champion", str(version))
        yield state


@pytest.fixture(scope="module")
def cluster(recommender: Path) -> Iterator[str]:
    """The scheduler address of a local cluster of two worker processes (started after the state folder)."""
    from distributed import LocalCluster

    with LocalCluster(**local_cluster_kwargs(EngineConfig(engine="dask", workers=2))) as local:
        yield str(local.scheduler_address)


def lists_of(result: RecommendResult) -> pd.DataFrame:
    return pd.read_parquet(result.output_path)


def assert_same_lists(one: pd.DataFrame, two: pd.DataFrame) -> None:
    assert list(one.columns) == list(two.columns) == LISTS
    pd.testing.assert_frame_equal(one.drop(columns="score"), two.drop(columns="score"))
    np.testing.assert_allclose(one["score"], two["score"], rtol=0, atol=1e-5)


def parts_of(result: RecommendResult) -> dict[str, int]:
    """Part file name -> modification time (ns) of a partitioned run's folder."""
    assert result.partitions is not None
    return {p.name: p.stat().st_mtime_ns for p in Path(result.partitions.output).glob("part-*.parquet")}


# -- fast: configuration and command line -------------------------------------------------------------------


def test_recommend_takes_the_engine_options_and_stays_local_by_default() -> None:
    assert RecommendConfig().engine.value == "local"
    with pytest.raises(ValidationError, match="set engine=dask"):
        RecommendConfig(address="tcp://10.0.0.5:8786")
    args = build_parser().parse_args(["recommend", "--user", "u0", "--workers", "3", "--partition-rows", "512"])
    assert engine_values(args) == {"engine": "dask", "workers": 3, "partition_rows": 512}
    args = build_parser().parse_args(["recommend", "--engine", "dask", "--address", "tcp://127.0.0.1:8786"])
    config = RecommendConfig(**engine_values(args))
    assert (config.engine.value, config.address) == ("dask", "tcp://127.0.0.1:8786")
    assert engine_values(build_parser().parse_args(["recommend"])) == {}


# -- flows --------------------------------------------------------------------------------------------------


def test_recommend_on_two_dask_workers_equals_one_process_and_a_rerun_skips_its_parts(
    recommender: Path, cluster: str, log_folder: Path, tmp_path: Path
) -> None:
    base = {"data_path": str(log_folder), "k": 5}
    local = recommend(RecommendConfig(**base, output_path=str(tmp_path / "local.parquet")))
    assert local.partitions is None and local.search.kind == "exact"

    dask = {**base, "engine": "dask", "address": cluster, "partition_rows": 8}
    on_dask = recommend(RecommendConfig(**dask, output_path=str(tmp_path / "dask.parquet")))
    run = on_dask.partitions
    assert run is not None and (run.parts, run.scored_parts, run.skipped_parts) == (6, 6, 0)  # 41 users
    assert len(run.worker_pids) == 2 and os.getpid() not in run.worker_pids
    assert (
        (on_dask.users, on_dask.rows, on_dask.search.kind) == (local.users, local.rows, "exact") == (41, 205, "exact")
    )
    assert_same_lists(lists_of(local), lists_of(on_dask))
    assert on_dask.embedding.cached == 80  # the catalogue was embedded once, by the local run
    work = Path(run.output)
    assert not (work / "vectors.npy").exists() and json.loads((work / MANIFEST).read_text())["complete"] is True

    # The same request again: every part is complete, nothing is scored, no worker is asked.
    written = parts_of(on_dask)
    again = recommend(RecommendConfig(**dask, output_path=str(tmp_path / "again.csv")))
    assert again.partitions is not None and again.partitions.output == run.output
    assert (again.partitions.scored_parts, again.partitions.skipped_parts, again.partitions.worker_pids) == (0, 6, [])
    assert parts_of(again) == written
    csv = pd.read_csv(again.output_path, dtype={"user": str, "item": str})
    assert_same_lists(lists_of(local), csv)

    # Two parts lost (a run stopped before writing them): only they are scored again.
    lost = sorted(written)[:2]
    for name in lost:
        (work / name).unlink()
    resumed = recommend(RecommendConfig(**dask, output_path=str(tmp_path / "resumed.parquet")))
    assert resumed.partitions is not None
    assert (resumed.partitions.scored_parts, resumed.partitions.skipped_parts) == (2, 4)
    kept = {n: t for n, t in parts_of(resumed).items() if n not in lost}
    assert kept == {n: t for n, t in written.items() if n not in lost}
    assert_same_lists(lists_of(local), lists_of(resumed))

    # Another k is another request: its own folder, nothing reused.
    other = recommend(RecommendConfig(**{**dask, "k": 3}, output_path=str(tmp_path / "k3.parquet")))
    assert other.partitions is not None and other.partitions.output != run.output
    assert other.partitions.scored_parts == 6 and other.rows == 41 * 3


def test_recommend_on_dask_through_an_index_equals_one_process(
    recommender: Path, cluster: str, log_folder: Path, tmp_path: Path
) -> None:
    base = {"data_path": str(log_folder), "k": 5, "ann_min_items": 10, "min_recall": 1.0}
    local = recommend(RecommendConfig(**base, output_path=str(tmp_path / "local.parquet")))
    on_dask = recommend(
        RecommendConfig(
            **base, output_path=str(tmp_path / "dask.parquet"), engine="dask", address=cluster, partition_rows=16
        )
    )
    assert local.search.kind == on_dask.search.kind == "hnsw" and on_dask.search.reused
    assert on_dask.search.params == local.search.params and on_dask.search.real_queries == 41
    assert on_dask.partitions is not None and on_dask.partitions.scored_parts == 3
    assert_same_lists(lists_of(local), lists_of(on_dask))


KILLED_RUN = """
import json, sys
from finetune_flows.flows.recommend import recommend
from finetune_flows.tasks.ranking.recommending import RecommendConfig
recommend(RecommendConfig.model_validate(json.loads(sys.argv[1])))
"""


def big_log(folder: Path, users: int) -> Path:
    """``users`` users over the 80 items of the small log: half like space films, half cooking shows."""
    folder.mkdir()
    space = [f"Rocket mission {i}. Space, Science Fiction. Tags: astronauts, orbit" for i in range(40)]
    cooking = [f"Pasta kitchen {i}. Cooking, Food. Tags: recipes, chef" for i in range(40)]
    catalogue = [(f"s{i}", t) for i, t in enumerate(space)] + [(f"c{i}", t) for i, t in enumerate(cooking)]
    pd.DataFrame(catalogue, columns=["item", "text"]).to_csv(folder / "items.csv", index=False)
    rows = [
        (f"u{user}", f"{'sc'[user % 2]}{(user * 3 + step * 7) % 40}", 5, 1000 + 10 * step)
        for user in range(users)
        for step in range(6)
    ]
    pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    return folder


def test_a_killed_recommend_run_resumes_where_it_stopped(recommender: Path, cluster: str, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    folder = big_log(tmp_path / "log", users=1200)
    config = RecommendConfig(
        data_path=str(folder), k=3, engine="dask", workers=1, partition_rows=40,
        output_path=str(tmp_path / "killed.parquet"),
    )  # fmt: skip
    parts = recommender / "recommendations" / "parts"
    before = set(parts.glob("*"))
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, config.model_dump_json()],
            env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if [p for p in parts.glob("*/part-*.parquet") if p.parent not in before]:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the flow process and its Dask workers
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    (work,) = set(parts.glob("*")) - before
    done = {p.name: p.stat().st_mtime_ns for p in work.glob("part-*.parquet")}
    assert 1 <= len(done) < 30 and json.loads((work / MANIFEST).read_text())["complete"] is False

    resumed = recommend(config.model_copy(update={"workers": 2, "address": cluster}))  # the same request
    assert resumed.partitions is not None and resumed.partitions.output == str(work)
    assert (resumed.partitions.parts, resumed.partitions.skipped_parts) == (30, len(done))
    assert {n: t for n, t in done.items() if (work / n).is_file() and (work / n).stat().st_mtime_ns == t} == done
    assert resumed.rows == 1200 * 3
    local = recommend(config.model_copy(update={"engine": "local", "output_path": str(tmp_path / "local.parquet")}))
    assert_same_lists(lists_of(local), lists_of(resumed))


def test_the_gate_drawn_from_the_sampled_queries_alone_is_the_gate_of_them_all() -> None:
    from finetune_flows.tasks.ranking.ann_index import SearchOptions, build_neighbours, gate_draw

    rng = np.random.default_rng(7)
    vectors, queries = rng.standard_normal((2000, 16)).astype(np.float32), rng.standard_normal((300, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    options = SearchOptions(ann_min_items=100, recall_queries=50, max_ef_search=16, min_recall=0.5)

    probes, rows = gate_draw(len(vectors), len(queries), options)
    _, whole = build_neighbours(vectors, options, None, queries)
    _, sampled = build_neighbours(vectors, options, None, queries[rows])

    assert (len(probes), len(rows), whole.real_queries) == (50, 50, 50) and np.all(np.diff(rows) > 0)
    assert whole.model_dump(exclude={"build_seconds"}) == sampled.model_dump(exclude={"build_seconds"})


def test_recommend_without_a_champion_names_the_model_and_alias(tmp_path: Path) -> None:
    missing = r"no version of registered model 'shop-items' has alias 'champion' in "
    with state_folder(tmp_path / "state"), pytest.raises(ConfigError, match=missing):
        fetch_scorer.fn(RecommendConfig(model_name="shop-items"))
    # retries are for a store that did not answer; waiting cannot make an alias appear
    assert not retry_unless_config_error(None, None, Failed(data=ConfigError("no version")))
    assert retry_unless_config_error(None, None, Failed(data=OSError("connection refused")))
