"""Local services for the deployments: a Prefect server, an MLflow tracking server, one worker per pool.

``up`` starts them on 127.0.0.1, creates the work pools that ``deployments/prefect.yaml`` names,
registers its deployments and records what it started in ``<state>/services/services.json``;
``status`` reads that record and checks it; ``down`` stops exactly the recorded process groups.
Each service's log is ``<state>/services/<name>.log``. Prefect's database, the MLflow store and its
artifact folder are the state folder's own, so runs and models made by ``finetune-flows run``, by
the workers, or by an earlier ``up`` are all found again. ``processes`` starts, probes and stops
the process groups (read from /proc, Linux).

With ``auth`` (``up --auth`` or ``FINETUNE_FLOWS_SERVICES_AUTH=true``) both servers require basic
auth and every client ``up`` starts gets the credentials in its environment (see ``service_auth``);
the health endpoints stay public, so ``status`` and ``down`` work the same.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import BaseModel

from finetune_flows.flows.cli.notifications import wire_notifications
from finetune_flows.flows.cli.processes import (
    HOST,
    Service,
    ServiceError,
    check_port_free,
    http_status,
    is_alive,
    is_healthy,
    spawn,
    stop_group,
    wait_healthy,
)
from finetune_flows.flows.cli.service_auth import (
    MLFLOW_PASSWORD_VARIABLE,
    MLFLOW_USERNAME_VARIABLE,
    PREFECT_AUTH_VARIABLE,
    ServiceAuth,
    auth_from_environment,
    basic_authorization,
    write_mlflow_auth_config,
)
from finetune_flows.tasks.core.settings import Settings

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the repository (deployments/ is not packaged)
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


class ServiceRecord(BaseModel):
    """What ``up`` started, as written to ``<state>/services/services.json``."""

    state_dir: str
    started_at: str
    prefect_url: str
    mlflow_url: str
    auth: bool = False  # basic auth on both servers (the credentials are never recorded)
    services: list[Service]


class ServiceStatus(BaseModel):
    """A recorded service as ``status`` finds it."""

    service: Service
    alive: bool
    healthy: bool | None  # None: the service has no health endpoint (a worker)


def record_path(settings: Settings) -> Path:
    return settings.state / "services" / "services.json"


def read_record(settings: Settings) -> ServiceRecord | None:
    path = record_path(settings)
    return ServiceRecord.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def work_pools(prefect_yaml: Path = PREFECT_YAML) -> list[str]:
    """The work pools the deployments of ``prefect_yaml`` run on, in order of first use."""
    spec = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    names = [d["work_pool"]["name"] for d in spec.get("deployments") or [] if d.get("work_pool")]
    return list(dict.fromkeys(names))


def service_env(
    settings: Settings, prefect_url: str, mlflow_url: str, auth: ServiceAuth | None = None
) -> dict[str, str]:
    """The environment of every service: this one, where the state, Prefect and MLflow are, the credentials."""
    env = dict(os.environ)
    env.update(auth.client_env() if auth else {})
    env.update(
        PREFECT_HOME=str(settings.prefect_home),
        PREFECT_API_URL=f"{prefect_url}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        FINETUNE_FLOWS_STATE_DIR=str(settings.state),
        FINETUNE_FLOWS_MLFLOW_TRACKING_URI=mlflow_url,
        FINETUNE_FLOWS_MLFLOW_ARTIFACT_ROOT=settings.artifact_root,
    )
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,plugins,flows")
    # MLflow's job runner (GenAI jobs, seven huey consumers) has nothing to do for us: keep 2 cores free.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _check_auth(service: Service, probe: str, authorization: str, variables: str) -> None:
    """``probe`` refuses a request without credentials (401) and answers one with them (200)."""
    anonymous, signed = http_status(probe), http_status(probe, authorization)
    if anonymous != 401:
        raise ServiceError(f"{service.name} answered {probe} without credentials ({anonymous}); see {service.log}")
    if signed != 200:
        raise ServiceError(
            f"{service.name} refused the credentials of {variables} at {probe} ({signed}); see {service.log}"
        )


def _ensure_pools(prefect_url: str, pools: list[str], auth_string: str | None) -> None:
    """Create each work pool (type process, Prefect's default job template) unless it exists."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with SyncPrefectClient(f"{prefect_url}/api", auth_string=auth_string) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
                logger.info("created work pool %s (process)", pool)
            except ObjectAlreadyExists:
                logger.info("work pool %s exists", pool)


def _wait_pools_ready(prefect_url: str, workers: dict[str, Service], deadline: float, auth_string: str | None) -> None:
    """Wait until every pool reports READY (its worker polls it)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import WorkPoolStatus

    with SyncPrefectClient(f"{prefect_url}/api", auth_string=auth_string) as client:
        for pool, worker in workers.items():
            while client.read_work_pool(pool).status != WorkPoolStatus.READY:
                if not is_alive(worker.pid):
                    raise ServiceError(f"{worker.name} exited before pool {pool} was ready; see its log {worker.log}")
                if time.monotonic() > deadline:
                    raise ServiceError(f"pool {pool} has no live worker in time; see the log {worker.log}")
                time.sleep(0.5)


def _deploy(env: dict[str, str], folder: Path, prefect_yaml: Path, timeout: float) -> None:
    """``prefect deploy --all`` from the repository root (entrypoints and ``{{ $PWD }}`` are relative to it)."""
    log = folder / "deploy.log"
    argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)]
    with log.open("ab") as out:
        result = subprocess.run(
            argv, cwd=ROOT, env={**env, "PWD": str(ROOT)}, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, timeout=timeout, check=False,
        )  # fmt: skip
    if result.returncode != 0:
        raise ServiceError(f"prefect deploy failed (exit code {result.returncode}); see its log {log}")
    logger.info("registered the deployments of %s", prefect_yaml)


def up(settings: Settings, prefect_yaml: Path = PREFECT_YAML, auth: bool | None = None) -> tuple[ServiceRecord, bool]:
    """Start the services unless a healthy set is already recorded; returns (record, started).

    ``auth`` (default: ``settings.services_auth``) turns on basic auth with the credentials of the
    environment (``service_auth.auth_from_environment``); missing ones fail before anything starts.
    """
    auth = settings.services_auth if auth is None else auth
    credentials = auth_from_environment() if auth else None
    record = read_record(settings)
    if record is not None:
        found = [check(s) for s in record.services]
        if all(s.alive and s.healthy is not False for s in found):
            if record.auth != auth:
                now = "with" if record.auth else "without"
                raise ServiceError(
                    f"the services are up {now} authentication (started {record.started_at}); "
                    f"run `finetune-flows down` first to restart them {'without' if record.auth else 'with'} it"
                )
            logger.info("already up: %s", ", ".join(f"{s.service.name} (pid {s.service.pid})" for s in found))
            if settings.notify_block:  # e.g. the block was created in the UI after the first `up`
                secret = credentials.prefect_auth_string.get_secret_value() if credentials else None
                wire_notifications(record.prefect_url, settings.notify_block, secret)
            return record, False
        logger.warning("a recorded service is down; stopping the rest and starting afresh")
        down(settings)
    check_port_free(settings.prefect_port, "FINETUNE_FLOWS_PREFECT_PORT")
    check_port_free(settings.mlflow_port, "FINETUNE_FLOWS_MLFLOW_PORT")
    folder = record_path(settings).parent
    folder.mkdir(parents=True, exist_ok=True)
    prefect_url, mlflow_url = f"http://{HOST}:{settings.prefect_port}", f"http://{HOST}:{settings.mlflow_port}"
    env = service_env(settings, prefect_url, mlflow_url, credentials)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    record = ServiceRecord(state_dir=str(settings.state), started_at=started_at, prefect_url=prefect_url,
                           mlflow_url=mlflow_url, auth=auth, services=[])  # fmt: skip
    prefect, mlflow = [sys.executable, "-m", "prefect"], [sys.executable, "-m", "mlflow"]
    prefect_env: dict[str, str] = {}
    mlflow_env: dict[str, str] = {}
    if credentials:
        config = write_mlflow_auth_config(folder / "mlflow-auth.ini", settings.state / "mlflow-auth.db")
        prefect_env, mlflow_env = credentials.prefect_server_env(), credentials.mlflow_server_env(config)

    def start(
        name: str,
        argv: list[str],
        url: str | None = None,
        health: str | None = None,
        extra: dict[str, str] | None = None,  # the environment of this service only
    ) -> Service:
        pid = spawn(name, argv, {**env, **(extra or {})}, folder)
        service = Service(name=name, pid=pid, log=str(folder / f"{name}.log"), url=url, health_url=health)
        record.services.append(service)
        record_path(settings).write_text(record.model_dump_json(indent=2), encoding="utf-8")
        return service

    try:
        # Both servers start at once; the MLflow server reads and writes the flows' own store and artifact root.
        prefect_argv = [*prefect, "server", "start", "--host", HOST, "--port", str(settings.prefect_port)]
        mlflow_argv = [*mlflow, "server", "--host", HOST, "--port", str(settings.mlflow_port), "--workers", "1",
                       "--backend-store-uri", settings.tracking_uri, "--default-artifact-root", settings.artifact_root,
                       "--artifacts-destination", settings.artifact_root]  # fmt: skip
        if credentials:
            mlflow_argv += ["--app-name", "basic-auth"]
        servers = [
            start("prefect-server", prefect_argv, prefect_url, f"{prefect_url}/api/health", prefect_env),
            start("mlflow-server", mlflow_argv, mlflow_url, f"{mlflow_url}/health", mlflow_env),
        ]
        deadline = time.monotonic() + settings.service_timeout
        for server in servers:
            wait_healthy(server, deadline)
        if credentials:
            _check_auth(servers[0], f"{prefect_url}/api/admin/version",
                        basic_authorization(credentials.prefect_auth_string.get_secret_value()),
                        PREFECT_AUTH_VARIABLE)  # fmt: skip
            _check_auth(servers[1], f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                        credentials.mlflow_authorization(),
                        f"{MLFLOW_USERNAME_VARIABLE}/{MLFLOW_PASSWORD_VARIABLE} (the admin user of the store "
                        f"{settings.state / 'mlflow-auth.db'} keeps the password it was created with)")  # fmt: skip
        auth_string = env.get(PREFECT_AUTH_VARIABLE)  # what the workers and `prefect deploy` send too
        pools = work_pools(prefect_yaml)
        _ensure_pools(prefect_url, pools, auth_string)
        _deploy(env, folder, prefect_yaml, settings.service_timeout)
        if settings.notify_block:  # a block saved on this server (the database outlives `down`)
            wire_notifications(prefect_url, settings.notify_block, auth_string)
        worker = [*prefect, "worker", "start", "--type", "process", "--pool"]
        workers = {p: start(f"worker-{p}", [*worker, p, "--name", f"finetune-flows-{p}"]) for p in pools}
        _wait_pools_ready(prefect_url, workers, time.monotonic() + settings.service_timeout, auth_string)
    except BaseException:
        down(settings)
        raise
    return record, True


def check(service: Service) -> ServiceStatus:
    alive = is_alive(service.pid)
    healthy = None if service.health_url is None else alive and is_healthy(service.health_url)
    return ServiceStatus(service=service, alive=alive, healthy=healthy)


def status(settings: Settings) -> list[ServiceStatus]:
    """Each recorded service: is its process alive, does its health endpoint answer."""
    record = read_record(settings)
    return [check(s) for s in record.services] if record else []


def down(settings: Settings, grace: float = 20.0) -> list[Service]:
    """Stop the recorded process groups (workers first, the servers last) and remove the record."""
    record = read_record(settings)
    if record is None:
        return []
    for service in reversed(record.services):
        stop_group(service, grace)
    record_path(settings).unlink()
    return record.services
