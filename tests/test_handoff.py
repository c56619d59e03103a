"""The training stage handed to another work pool: deployment ``train/sentiment-train`` from
deployments/prefect.yaml, served by a real process worker on pool ``gpu`` (in the test harness's
temporary database), runs as its own flow run and yields the same model as in-process training."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest

from finetune_flows.flows.finetune import finetune
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.train_request import RESULT_FILE, TrainResult
from tests.conftest import NEGATIVE, POSITIVE, write_tsv
from tests.test_recommender_flow import config_for as recommender_config

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "train/sentiment-train"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """288 train rows and 48 eval rows (disjoint texts): enough for the 256-text parity gate."""
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    suffixes = ["indeed", "overall", "really", "truly", "honestly", "frankly"] * 2
    train = [(f"{t} {s}{i // 6}", lab) for i, s in enumerate(suffixes) for t, lab in rows]
    evaluation = [(f"{t} {s}", lab) for s in ("in the end", "all in all") for t, lab in rows]
    return write_tsv(tmp_path / "train.tsv", train), write_tsv(tmp_path / "dev.tsv", evaluation)


def config_for(model_dir: Path, files: tuple[Path, Path], train_on: str | None = None) -> FinetuneConfig:
    return FinetuneConfig.for_scenario(
        "sentiment",
        {
            "model.source": str(model_dir), "model.max_length": 32, "data.train_path": str(files[0]),
            "data.eval_path": str(files[1]), "training.max_steps": 6, "training.eval_every_steps": 3,
            "training.batch_size": 16, "training.learning_rate": 5e-3, "training.precision": "fp32",
            "infrastructure.train_on": train_on,
        },
    )  # fmt: skip


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    """Pool ``gpu`` (type process) and the yaml's train deployment on it; the environment a worker needs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml"]
    done = subprocess.run(
        [*deploy, "--name", "sentiment-train", "--name", "recommendation-train"],
        cwd=ROOT,
        env={**env, "PWD": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return env


@pytest.fixture
def gpu_worker(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[Path]:
    """A process worker serving pool ``gpu``; yields its log."""
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        # Started from another folder: the deployment's pull step must bring runs to the checkout.
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type", "process"],
            cwd=tmp_path,
            env=worker_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield log
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def trained(run_id: str) -> tuple[TrainResult, Path]:
    run_dir = Path(mlflow.MlflowClient().get_run(run_id).data.tags["run_dir"])
    return TrainResult.model_validate_json((run_dir / RESULT_FILE).read_text()), run_dir


@pytest.mark.slow  # default suite: the recommender's hand-off below goes through the same pool
def test_training_on_the_gpu_pool_gives_the_same_model(state_dir, tiny_model_dir, files, gpu_worker) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from safetensors.torch import load_file

    started = datetime.now(UTC)  # the harness is shared: count only this test's runs
    local = finetune(config_for(tiny_model_dir, files))
    remote = finetune(config_for(tiny_model_dir, files, train_on=DEPLOYMENT))

    # A separate flow run of the deployment, on pool gpu, linked to the finetune run as a subflow.
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))
        runs = [r for r in runs if r.created is not None and r.created >= started]
        (handed,) = [r for r in runs if r.deployment_id is not None]
        assert client.read_deployment(handed.deployment_id).name == "sentiment-train"
    assert handed.work_pool_name == "gpu" and handed.state is not None and handed.state.is_completed()
    assert handed.parent_task_run_id is not None
    assert len([r for r in runs if r.deployment_id is None]) == 1  # the in-process one

    # The same seed gives the same model either way.
    (here, here_dir), (there, there_dir) = trained(local.run_id), trained(remote.run_id)
    assert there.steps == here.steps == 6
    assert there.weights_checksum == pytest.approx(here.weights_checksum, rel=1e-6)
    a, b = load_file(here_dir / "model" / "model.safetensors"), load_file(there_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert remote.metrics == pytest.approx(local.metrics, abs=1e-6)


def test_a_missing_train_deployment_fails_the_run_naming_the_stage(state_dir, tiny_model_dir, files) -> None:
    state = finetune(config_for(tiny_model_dir, files, train_on="train/no-such-deployment"), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("stage hand-off-training failed: RuntimeError: infrastructure.train_on=")
    assert "no such deployment" in state.message


def test_a_hand_off_no_worker_picks_up_is_cancelled_and_fails_the_run(
    state_dir, tiny_model_dir, files, worker_env
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = config_for(tiny_model_dir, files, train_on=DEPLOYMENT)
    config = config.model_copy(
        update={"infrastructure": config.infrastructure.model_copy(update={"start_timeout_s": 3})}
    )
    state = finetune(config, return_state=True)  # pool gpu has no worker in this test

    assert state.is_failed()
    assert state.message.startswith("stage hand-off-training failed: RuntimeError: training flow run")
    assert "no worker picked it up within 3 s" in state.message and "--pool gpu" in state.message
    run_id = state.message.split("(")[1].split(")")[0]
    with get_client(sync_client=True) as client:
        (handed,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert handed.state is not None and handed.state.is_cancelled()  # a worker started later will not run it


def test_the_recommender_trains_on_the_gpu_pool_like_in_process(
    state_dir, tiny_model_dir, log_folder, gpu_worker
) -> None:
    """The bi-encoder goes through the same hand-off: deployment train/recommendation-train, same weights."""
    from safetensors.torch import load_file

    # The ranking evaluation scores the served graph, and the export ladder serves whichever variant is fastest
    # on the clock at that moment: both runs serve the fp32 graph, so the metrics compare training alone.
    fp32 = {"export.served": "fp32"}
    local = finetune(recommender_config(tiny_model_dir, log_folder, epochs=1, **fp32))
    remote = finetune(
        recommender_config(
            tiny_model_dir, log_folder, epochs=1, **{"infrastructure.train_on": "train/recommendation-train", **fp32}
        )
    )
    (here, here_dir), (there, there_dir) = trained(local.run_id), trained(remote.run_id)
    assert there.steps == here.steps > 0
    a, b = load_file(here_dir / "model" / "model.safetensors"), load_file(there_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert remote.metrics == pytest.approx(local.metrics, abs=1e-6)
    assert remote.version == "2" and local.version == "1"
