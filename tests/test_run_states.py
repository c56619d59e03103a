"""Interrupted runs, through the CLI as a user meets them (issue 11, items 1 and 2): `kill -9` and SIGTERM during
training leave no orphan Prefect server, SIGTERM leaves the MLflow run KILLED and the flow run Crashed, and
`finetune-flows resume` finishes either run, to the weights of an uninterrupted one; two first runs on a new state
folder both succeed."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from finetune_flows.tasks.core.checkpoints import MARKER
from tests.conftest import NEGATIVE, POSITIVE, run_cli, services_environment, write_tsv

pytestmark = pytest.mark.slow  # real subprocesses killed mid-run and temporary servers: minutes

ROOT = Path(__file__).resolve().parents[1]


def cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_flows.flows.cli.main", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interrupt(env: dict[str, str], args: list[str], state: Path, sig: signal.Signals) -> tuple[Path, str, list[int]]:
    """Start ``finetune-flows run``, send ``sig`` once checkpoint-8 is complete; (run folder, output, its children)."""
    before = set(state.glob("runs/*"))
    proc = cli(env, "run", *args)
    deadline = time.monotonic() + 300
    while not (
        marked := [m for m in state.glob(f"runs/*/checkpoints/checkpoint-8/{MARKER}") if m.parents[2] not in before]
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training ended before it was interrupted:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    spawned = children(proc.pid)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    return marked[0].parents[2], out, spawned


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("run-states")
    state = work / "state"
    env = services_environment(state)
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    words = ("indeed", "overall", "really", "truly", "honestly", "frankly", "clearly", "simply", "surely", "plainly",
             "certainly", "obviously")  # 288 rows: the parity gate takes 256 texts  # fmt: skip
    train = write_tsv(work / "train.tsv", [(f"{t} {w}", lab) for w in words for t, lab in rows])
    dev = write_tsv(work / "dev.tsv", [(f"{t} in the end", lab) for t, lab in rows])
    args = ["sentiment", "--data", str(train), str(dev), "--set", f"model.source={tiny_model_dir}",
            "--set", "model.max_length=32", "--set", "training.max_steps=40", "--set", "training.eval_every_steps=4",
            "--set", "training.batch_size=8", "--set", "training.early_stopping_patience=100"]  # fmt: skip
    straight = run_cli(env, "run", *args, timeout=600)
    killed_dir, killed_out, killed_children = interrupt(env, args, state, signal.SIGKILL)
    termed_dir, termed_out, termed_children = interrupt(env, args, state, signal.SIGTERM)
    status = {d.name: mlflow_run(state, d).info.status for d in (killed_dir, termed_dir)}
    survey = run_cli(env, "gc", "--min-age-hours", "0")
    resumed_killed = run_cli(env, "resume", killed_dir.name, timeout=600)
    resumed_termed = run_cli(env, "resume", termed_dir.name, timeout=600)
    return {"state": state, "straight": straight, "killed": (killed_dir, killed_out, killed_children),
            "termed": (termed_dir, termed_out, termed_children), "status_before": status, "gc": survey,
            "resumed_killed": resumed_killed, "resumed_termed": resumed_termed, "env": env}  # fmt: skip


def mlflow_client(state: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{state / 'mlflow.db'}")


def all_runs(state: Path) -> list[Any]:
    client = mlflow_client(state)
    experiment = client.get_experiment_by_name("finetune-sentiment")
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id]))


def mlflow_run(state: Path, run_dir: Path) -> Any:
    return next(run for run in all_runs(state) if run.data.tags.get("run_dir") == str(run_dir))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_no_temporary_prefect_server_outlives_a_killed_run(runs) -> None:
    for name in ("killed", "termed"):
        spawned = runs[name][2]
        assert spawned, "the run started no temporary Prefect server"
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in spawned if alive(pid)], f"{name}: orphans {spawned}"


def test_sigterm_leaves_the_mlflow_run_killed_and_kill_9_leaves_it_running(runs) -> None:
    killed_dir, termed_dir = runs["killed"][0], runs["termed"][0]
    assert runs["status_before"] == {killed_dir.name: "RUNNING", termed_dir.name: "KILLED"}


def test_gc_keeps_a_run_killed_by_kill_9_and_says_how_to_resume_it(runs) -> None:
    killed_dir, termed_dir = runs["killed"][0], runs["termed"][0]
    rows = [line for line in ok(runs["gc"]).splitlines() if line.startswith(("keep", "free"))]
    lines = {next(w for w in line.split() if w.startswith("sentiment-")): line for line in rows}  # "keep 1.5 MB <name>"
    assert lines[killed_dir.name].startswith("keep"), lines
    assert (
        f"was interrupted (RUNNING, no process works on it): `finetune-flows resume {killed_dir.name}`"
        in lines[killed_dir.name]
    )
    assert lines[termed_dir.name].startswith("free") and "KILLED, no model version" in lines[termed_dir.name]


def test_resume_finishes_both_runs_to_the_weights_of_an_uninterrupted_one(runs) -> None:
    served = next(line for line in ok(runs["straight"]).splitlines() if line.startswith("ONNX"))
    graph = Path(served.split(": ", 1)[1].rsplit(" (", 1)[0])  # "ONNX (served) : <path> (<variant>)"
    straight_dir = next(folder for folder in graph.parents if folder.name == "onnx").parent
    reference = load_file(straight_dir / "model" / "model.safetensors")
    for name in ("killed", "termed"):
        out = ok(runs[f"resumed_{name}"])
        assert "=== finetune-flows: run complete ===" in out
        resumed = load_file(runs[name][0] / "model" / "model.safetensors")
        assert reference.keys() == resumed.keys()
        assert all(torch.equal(reference[k], resumed[k]) for k in reference), name

    for name in ("killed", "termed"):
        run = mlflow_run(runs["state"], runs[name][0])
        assert (run.info.status, run.data.tags["resumes"], "failed_stage" in run.data.tags) == ("FINISHED", "1", False)
    versions = mlflow_client(runs["state"]).search_model_versions("name = 'sentiment'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in all_runs(runs["state"]))
    assert len(versions) == 3  # one per run, the resumed ones included


def test_flow_runs_end_completed_or_crashed_never_running(runs) -> None:
    with sqlite3.connect(runs["state"] / "prefect" / "prefect.db") as db:
        states = [row[0] for row in db.execute("SELECT state_type FROM flow_run WHERE name IS NOT NULL")]
    assert "RUNNING" not in states and states.count("CRASHED") == 4, states  # the pipeline and its train subflow
    assert "marked 2 flow runs that never ended Crashed" in ok(runs["resumed_killed"]) + runs["resumed_killed"].stderr


def test_resume_names_what_exists_for_an_unknown_run(runs) -> None:
    unknown = run_cli(runs["env"], "resume", "no-such-run")
    assert unknown.returncode == 2, unknown.stderr[-3000:]
    assert f"no run folder or MLflow run id 'no-such-run' in {runs['state'] / 'runs'} (newest: " in unknown.stderr
    assert runs["killed"][0].name in unknown.stderr


def test_two_first_runs_on_a_new_state_folder_both_succeed(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = services_environment(tmp_path / "state")
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    train = write_tsv(tmp_path / "train.tsv", [(f"{t} {i}", lab) for i in range(11) for t, lab in rows])
    args = ["sentiment", "--data", str(train), "--set", f"model.source={tiny_model_dir}", "--set",
            "model.max_length=32", "--set", "training.max_steps=2", "--set", "training.eval_every_steps=2"]  # fmt: skip
    first, second = cli(env, "run", *args), cli(env, "run", *args)
    outputs = [proc.communicate(timeout=600)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n=====\n".join(o[-3000:] for o in outputs)
    assert sorted(str(v.version) for v in mlflow_client(tmp_path / "state").search_model_versions("")) == ["1", "2"]
