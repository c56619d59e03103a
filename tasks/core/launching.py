"""Running the training stage elsewhere: across processes with torchrun, or as a deployment on another pool.

``fine_tune`` trains in the stage's own process, or, with ``infrastructure.processes > 1``, with
``torchrun --nproc_per_node N -m finetune_flows.tasks.core.training`` (one process per device,
DDP; gloo on CPU). ``hand_off_training`` starts the training flow as a deployment (the gpu pool)
with ``run_deployment``, passing only the ``TrainRequest`` (paths, URIs, small models), waits for
a worker to run it, and reads the ``TrainResult`` the stage left next to its checkpoints. A
handed-off run that no worker picks up within ``infrastructure.start_timeout_s`` is cancelled.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

from prefect import task
from prefect.client.schemas.objects import FlowRun

from finetune_flows.tasks.core.checkpoints import resume_point
from finetune_flows.tasks.core.progress import prefect_progress_callback
from finetune_flows.tasks.core.train_request import TrainRequest, TrainResult
from finetune_flows.tasks.core.training import train_tracked

logger = logging.getLogger(__name__)


def launch_distributed(request: TrainRequest) -> TrainResult:
    """Train with ``torchrun --nproc_per_node N -m finetune_flows.tasks.core.training``: one process per device, DDP.

    On CPU the processes talk gloo; with GPUs each gets its own process and NCCL. Their output
    goes to this stage's log; the main process writes the result file read here.
    """
    run_dir = Path(request.run.run_dir)
    if request.resume:
        resume_point(run_dir / "checkpoints")  # set incomplete checkpoints aside before the ranks look
    elif (run_dir / "checkpoints").exists():
        raise RuntimeError(f"{run_dir / 'checkpoints'} exists already: a run folder is never reused")
    request_path = run_dir / "train_request.json"
    request_path.write_text(request.model_dump_json(indent=2), encoding="utf-8")
    run_torchrun("finetune_flows.tasks.core.training", request_path, request.infrastructure.processes)
    return TrainResult.model_validate_json(request.result_path.read_text(encoding="utf-8"))


def run_torchrun(module: str, request_path: Path, processes: int) -> None:
    """``torchrun --standalone --nproc_per_node processes -m module request_path``, its output in this log; a
    failure is a RuntimeError with the last 20 lines."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", module, str(request_path),
    ]  # fmt: skip
    logger.info("launching %s", " ".join(command))
    env = {**os.environ, "TQDM_DISABLE": "1"}  # progress bars would flood the log
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            logger.info("torchrun: %s", line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun with {processes} processes exited with {proc.returncode}; last output:\n" + "\n".join(tail)
        )


@task(name="fine-tune")
def fine_tune(request: TrainRequest) -> TrainResult:
    """Train on the tokenized data, in this process or across ``infrastructure.processes`` with torchrun."""
    if request.infrastructure.processes > 1:
        return launch_distributed(request)
    callbacks = [prefect_progress_callback(request.progress_key)] if request.progress_key else []
    return train_tracked(request, callbacks)


def wait_for_flow_run(flow_run: FlowRun, start_timeout_s: float, poll_s: float = 2.0) -> FlowRun:
    """Wait until ``flow_run`` is final; cancel it and raise when no worker has picked it up in ``start_timeout_s``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    deadline = time.monotonic() + start_timeout_s
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run.id)
            state = flow_run.state
            if state is not None and state.is_final():
                return flow_run
            if (state is None or state.type is StateType.SCHEDULED) and time.monotonic() > deadline:
                pool = flow_run.work_pool_name or "its work pool"
                message = f"no worker picked it up within {start_timeout_s:g} s"
                client.set_flow_run_state(flow_run.id, Cancelled(message=message), force=True)
                raise RuntimeError(
                    f"training flow run {flow_run.name!r} ({flow_run.id}) was cancelled: {message}; start a worker "
                    f"with `prefect worker start --pool {pool}` (or `finetune-flows up`), or raise "
                    "infrastructure.start_timeout_s"
                )
            time.sleep(poll_s)


@task(name="hand-off-training")
def hand_off_training(request: TrainRequest, deployment: str) -> TrainResult:
    """Run the training stage as ``deployment`` (another work pool), wait for it, and read its result."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger.info("handing training to deployment %s; waiting for its flow run", deployment)
    try:
        flow_run = cast(
            FlowRun,
            run_deployment(name=deployment, parameters={"request": request.model_dump(mode="json")}, timeout=0),
        )
    except ObjectNotFound as exc:
        raise RuntimeError(
            f"infrastructure.train_on={deployment!r}: no such deployment; deploy it with "
            "`prefect deploy --all --prefect-file deployments/prefect.yaml` (e.g. train/sentiment-train)"
        ) from exc
    flow_run = wait_for_flow_run(flow_run, request.infrastructure.start_timeout_s)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"training flow run {flow_run.name!r} ({flow_run.id}) of deployment {deployment!r} ended "
            f"{state.name if state else 'without a state'}: {state.message if state else ''}"
        )
    result = TrainResult.model_validate_json(request.result_path.read_text(encoding="utf-8"))
    logger.info("training flow run %s finished: %d steps, model %s", flow_run.name, result.steps, result.model_dir)
    return result
