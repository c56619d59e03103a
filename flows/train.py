"""Flow ``train``: the training stage as its own flow, so it can run on another work pool (a GPU one).

``finetune`` calls it in its own process (a subflow) by default. With ``infrastructure.train_on`` set
to a deployment ``<flow>/<deployment>`` (``train/sentiment-train`` on pool ``gpu``, see
deployments/prefect.yaml), ``hand_off_training`` starts that deployment with
``run_deployment``, passing only a ``TrainRequest`` (paths, URIs, small models), waits for it, and
reads the ``TrainResult`` the stage left next to its checkpoints: so the data, the run folder
and the MLflow store must be reachable from both workers (one machine, or shared storage). A
handed-off run that no worker picks up within ``infrastructure.start_timeout_s`` is cancelled, and the
stage fails naming the pool.

Inside the stage, ``infrastructure.processes > 1`` trains with torchrun, one process per device (DDP).
"""

from __future__ import annotations

from prefect import flow

from finetune_flows.tasks.core.failures import stage_failed
from finetune_flows.tasks.core.launching import fine_tune, hand_off_training
from finetune_flows.tasks.core.train_request import TrainRequest, TrainResult


@flow(name="train", log_prints=False)
def train_stage(request: TrainRequest) -> TrainResult:
    """Fine-tune the checkpoint at ``request.model_dir`` on the tokenized data; the model lands in the run folder."""
    try:
        return fine_tune(request)
    except Exception as exc:
        return stage_failed(exc, [fine_tune])


def run_training(request: TrainRequest, deployment: str | None) -> TrainResult:
    """The training stage: a subflow of the calling flow run, or a run of ``deployment`` when one is named."""
    return hand_off_training(request, deployment) if deployment else train_stage(request)
