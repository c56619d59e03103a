"""``finetune-flows up / status / down`` for real: a Prefect server, an MLflow server and one worker
per pool on free 127.0.0.1 ports, in a temporary state folder, run through the command line.

One set of services serves the whole module (starting it takes 30-60 s on 2 cores); the last test
stops it and checks that nothing of it is left.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_flows.flows.cli.services import PREFECT_YAML, ROOT, ServiceRecord, group_members, is_healthy, work_pools
from tests.conftest import free_port, services_environment
from tests.conftest import run_cli as cli

pytestmark = pytest.mark.slow


def read_record(env: dict[str, str]) -> ServiceRecord:
    path = Path(env["FINETUNE_FLOWS_STATE_DIR"]) / "services" / "services.json"
    return ServiceRecord.model_validate_json(path.read_text(encoding="utf-8"))


def test_status_before_up_says_not_up(tmp_path: Path) -> None:
    result = cli(services_environment(tmp_path / "state"), "status")
    assert (result.returncode, result.stdout) == (3, "not up\n")


def test_status_reports_every_service_running_and_healthy(services: dict[str, str]) -> None:
    record = read_record(services)
    assert [s.name for s in record.services] == [
        "prefect-server",
        "mlflow-server",
        *(f"worker-{pool}" for pool in work_pools()),
    ]
    result = cli(services, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    for service in record.services:
        assert f"{service.name}" in result.stdout and f"pid {service.pid}" in result.stdout
        assert Path(service.log).is_file()
    assert result.stdout.count("running healthy") == 2
    assert "NOT" not in result.stdout
    assert f"up: Prefect UI {record.prefect_url}, MLflow UI {record.mlflow_url}" in result.stdout
    assert is_healthy(f"{record.prefect_url}/api/health") and is_healthy(f"{record.mlflow_url}/health")


def test_up_twice_starts_no_second_set(services: dict[str, str]) -> None:
    before = read_record(services)
    result = cli(services, "up")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("already up"), result.stdout
    assert f"Prefect UI : {before.prefect_url}" in result.stdout
    assert read_record(services) == before


def test_deployments_and_pools_are_registered(services: dict[str, str]) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import WorkPoolStatus

    spec = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    expected = {d["name"]: d for d in spec["deployments"]}
    with SyncPrefectClient(f"{read_record(services).prefect_url}/api") as client:
        for pool in work_pools():
            found = client.read_work_pool(pool)
            assert (found.type, found.status) == ("process", WorkPoolStatus.READY)
        deployments = {d.name: d for d in client.read_deployments()}
    assert set(deployments) == set(expected)
    for name, deployment in deployments.items():
        given = expected[name].get("parameters", {})
        assert deployment.work_pool_name == expected[name]["work_pool"]["name"]
        assert deployment.parameters == given
        properties = (deployment.parameter_openapi_schema or {}).get("properties", {})
        assert properties and set(given) <= set(properties), name  # a typed form that takes the given values
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    for name, deployment in deployments.items():  # schedules: cron or interval, time zone, on/off
        wanted = [
            (str(w.get("cron") or float(w["interval"])), w["timezone"], w.get("active", True))
            for w in expected[name].get("schedules", [])
        ]
        got = [
            (
                str(getattr(s.schedule, "cron", None) or s.schedule.interval.total_seconds()),
                s.schedule.timezone,
                s.active,
            )
            for s in deployment.schedules
        ]
        assert got == wanted, name
    retrain = [d for name, d in deployments.items() if name.endswith("-retrain")]
    assert retrain and all(getattr(d.schedules[0].schedule, "cron", None) for d in retrain)
    training = schema_definition(deployments["sentiment-finetune"].parameter_openapi_schema, "TrainingConfig")
    assert training["properties"]["epochs"]["exclusiveMinimum"] == 0.0


def schema_definition(schema: dict | None, name: str) -> dict:
    assert schema is not None
    return dict(schema["definitions"][name])


def test_down_stops_every_process_of_ours(services: dict[str, str]) -> None:
    record = read_record(services)
    assert all(group_members(s.pid) for s in record.services)
    result = cli(services, "down")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stopped: prefect-server"), result.stdout
    assert [s.pid for s in record.services if group_members(s.pid)] == []
    assert not is_healthy(f"{record.prefect_url}/api/health") and not is_healthy(f"{record.mlflow_url}/health")
    assert (cli(services, "status").stdout, cli(services, "down").stdout) == ("not up\n", "not up\n")


def test_a_taken_port_is_named_with_the_setting_that_moves_it(tmp_path: Path) -> None:
    import socket

    from finetune_flows.flows.cli.services import ServiceError, read_record, up
    from finetune_flows.tasks.core.settings import Settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(state_dir=tmp_path / "state", prefect_port=port)
        with pytest.raises(ServiceError, match=f"port 127.0.0.1:{port} is in use.*FINETUNE_FLOWS_PREFECT_PORT"):
            up(settings)
    assert read_record(settings) is None


def test_a_service_that_never_answers_is_named_with_its_log(tmp_path: Path) -> None:
    import subprocess
    import time

    from finetune_flows.flows.cli.services import Service, ServiceError, _wait_healthy

    with subprocess.Popen(["sleep", "30"], start_new_session=True) as sleeper:
        service = Service(name="mlflow-server", pid=sleeper.pid, log=str(tmp_path / "mlflow-server.log"),
                          health_url=f"http://127.0.0.1:{free_port()}/health")  # fmt: skip
        try:
            with pytest.raises(
                ServiceError, match=r"mlflow-server did not answer .*/health in time .*mlflow-server\.log"
            ):
                _wait_healthy(service, time.monotonic() + 1)
        finally:
            sleeper.kill()
