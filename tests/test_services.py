"""``finetune-flows up / status / down`` for real: a Prefect server, an MLflow server and one worker
per pool on free 127.0.0.1 ports, in a temporary state folder, run through the command line.

One set of services serves the first tests (starting it takes 30-60 s on 2 cores); the last of them
stops it and checks that nothing of it is left. Then ``up --auth`` starts a second set the same way,
with canary credentials, for the authentication tests at the end.
"""

from __future__ import annotations

import subprocess
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from secrets import token_hex
from typing import NamedTuple

import pytest
import yaml

from finetune_flows.flows.cli.processes import group_members, is_healthy
from finetune_flows.flows.cli.services import PREFECT_YAML, ROOT, ServiceRecord, work_pools
from tests.conftest import free_port, services_environment
from tests.conftest import run_cli as cli

slow = pytest.mark.slow  # the tests that start real services (the checks of bad input before that are fast)


def read_record(env: dict[str, str]) -> ServiceRecord:
    path = Path(env["FINETUNE_FLOWS_STATE_DIR"]) / "services" / "services.json"
    return ServiceRecord.model_validate_json(path.read_text(encoding="utf-8"))


@slow
def test_status_before_up_says_not_up(tmp_path: Path) -> None:
    result = cli(services_environment(tmp_path / "state"), "status")
    assert (result.returncode, result.stdout) == (3, "not up\n")


@slow
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


@slow
def test_up_twice_starts_no_second_set(services: dict[str, str]) -> None:
    before = read_record(services)
    result = cli(services, "up")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("already up"), result.stdout
    assert f"Prefect UI : {before.prefect_url}" in result.stdout
    assert read_record(services) == before


@slow
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


@slow
def test_down_stops_every_process_of_ours(services: dict[str, str]) -> None:
    record = read_record(services)
    assert all(group_members(s.pid) for s in record.services)
    result = cli(services, "down")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stopped: prefect-server"), result.stdout
    assert [s.pid for s in record.services if group_members(s.pid)] == []
    assert not is_healthy(f"{record.prefect_url}/api/health") and not is_healthy(f"{record.mlflow_url}/health")
    assert (cli(services, "status").stdout, cli(services, "down").stdout) == ("not up\n", "not up\n")


@slow
def test_a_taken_port_is_named_with_the_setting_that_moves_it(tmp_path: Path) -> None:
    import socket

    from finetune_flows.flows.cli.processes import ServiceError
    from finetune_flows.flows.cli.services import read_record, up
    from finetune_flows.tasks.core.settings import Settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(state_dir=tmp_path / "state", prefect_port=port)
        with pytest.raises(ServiceError, match=f"port 127.0.0.1:{port} is in use.*FINETUNE_FLOWS_PREFECT_PORT"):
            up(settings)
    assert read_record(settings) is None


@slow
def test_a_service_that_never_answers_is_named_with_its_log(tmp_path: Path) -> None:
    import subprocess
    import time

    from finetune_flows.flows.cli.processes import Service, ServiceError, wait_healthy

    with subprocess.Popen(["sleep", "30"], start_new_session=True) as sleeper:
        service = Service(name="mlflow-server", pid=sleeper.pid, log=str(tmp_path / "mlflow-server.log"),
                          health_url=f"http://127.0.0.1:{free_port()}/health")  # fmt: skip
        try:
            with pytest.raises(
                ServiceError, match=r"mlflow-server did not answer .*/health in time .*mlflow-server\.log"
            ):
                wait_healthy(service, time.monotonic() + 1)
        finally:
            sleeper.kill()


AUTH_VARIABLES = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def test_up_auth_without_credentials_names_them_and_starts_nothing(tmp_path: Path) -> None:
    env = services_environment(tmp_path / "state")  # no PREFECT_*/MLFLOW_* variables at all
    result = cli({**env, "MLFLOW_TRACKING_USERNAME": "team"}, "up", "--auth", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "set PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_PASSWORD" in result.stderr, result.stderr
    assert "Nothing was started" in result.stderr and "started" not in result.stdout
    assert not (tmp_path / "state" / "services").exists()
    for port in (env["FINETUNE_FLOWS_PREFECT_PORT"], env["FINETUNE_FLOWS_MLFLOW_PORT"]):
        assert not is_healthy(f"http://127.0.0.1:{port}/health")


def test_the_auth_setting_needs_the_same_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_flows.flows.cli.services import read_record, up
    from finetune_flows.plugins.errors import ConfigError
    from finetune_flows.tasks.core.settings import Settings

    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FINETUNE_FLOWS_SERVICES_AUTH", "true")
    settings = Settings(state_dir=tmp_path / "state", prefect_port=free_port(), mlflow_port=free_port())
    assert settings.services_auth
    with pytest.raises(ConfigError, match="set PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_P"):
        up(settings)
    assert read_record(settings) is None and not (settings.state / "services").exists()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"PREFECT_API_AUTH_STRING": "no-colon-here"}, "PREFECT_API_AUTH_STRING must be user:password"),
        ({"PREFECT_API_AUTH_STRING": ":password-only"}, "PREFECT_API_AUTH_STRING must be user:password"),
        ({"MLFLOW_TRACKING_PASSWORD": "short-11chr"}, "MLFLOW_TRACKING_PASSWORD has 11 characters; .* at least 12"),
    ],
)
def test_unusable_credentials_are_named(variables: dict[str, str], message: str) -> None:
    from finetune_flows.flows.cli.service_auth import auth_from_environment
    from finetune_flows.plugins.errors import ConfigError

    good = {
        "PREFECT_API_AUTH_STRING": "team:pw",
        "MLFLOW_TRACKING_USERNAME": "team",
        "MLFLOW_TRACKING_PASSWORD": "x" * 12,
    }
    auth_from_environment(good)  # accepted as it is
    with pytest.raises(ConfigError, match=message):
        auth_from_environment({**good, **variables})


class AuthServices(NamedTuple):
    env: dict[str, str]
    secrets: list[str]  # every secret, as given and as a basic-auth token would carry it
    up: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def auth_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServices]:
    """``finetune-flows up --auth`` with canary credentials in a fresh state folder; ``down`` afterwards."""
    prefect_password, mlflow_password = f"pf-canary-{token_hex(8)}", f"ml-canary-{token_hex(8)}"
    credentials = {
        "PREFECT_API_AUTH_STRING": f"team:{prefect_password}",
        "MLFLOW_TRACKING_USERNAME": "team-admin",
        "MLFLOW_TRACKING_PASSWORD": mlflow_password,
    }
    env = {**services_environment(tmp_path_factory.mktemp("auth") / "state"), **credentials}
    tokens = [b64encode(s.encode()).decode() for s in (f"team:{prefect_password}", f"team-admin:{mlflow_password}")]
    try:
        result = cli(env, "up", "--auth")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("started"), result.stdout
        yield AuthServices(env, [prefect_password, mlflow_password, *tokens], result)
    finally:
        cli(env, "down")


def get(url: str, user_password: str | None = None) -> int | None:
    from finetune_flows.flows.cli.processes import http_status
    from finetune_flows.flows.cli.service_auth import basic_authorization

    return http_status(url, basic_authorization(user_password) if user_password else None, timeout=10)


@slow
def test_up_auth_refuses_requests_without_the_credentials(auth_services: AuthServices) -> None:
    env, record = auth_services.env, read_record(auth_services.env)
    assert record.auth
    assert "(basic auth: PREFECT_API_AUTH_STRING)" in auth_services.up.stdout
    prefect_api, mlflow_api = f"{record.prefect_url}/api", f"{record.mlflow_url}/api/2.0/mlflow"
    mlflow_login = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"
    for url, login in [
        (f"{prefect_api}/admin/version", env["PREFECT_API_AUTH_STRING"]),
        (f"{mlflow_api}/experiments/search?max_results=10", mlflow_login),
        (f"{mlflow_api}/registered-models/search", mlflow_login),
    ]:
        assert (get(url), get(url, "team:wrong-password"), get(url, login)) == (401, 401, 200), url
    # The health endpoints stay public, so `status` works as without auth.
    assert get(f"{prefect_api}/health") == 200 and get(f"{record.mlflow_url}/health") == 200
    result = cli(env, "status")
    assert result.returncode == 0 and result.stdout.count("running healthy") == 2, result.stdout


@slow
def test_up_auth_clients_registered_the_deployments_with_the_credentials(auth_services: AuthServices) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import WorkPoolStatus
    from prefect.exceptions import PrefectHTTPStatusError

    env, record = auth_services.env, read_record(auth_services.env)
    expected = {d["name"] for d in yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))["deployments"]}
    with SyncPrefectClient(f"{record.prefect_url}/api", auth_string=env["PREFECT_API_AUTH_STRING"]) as client:
        assert {d.name for d in client.read_deployments()} == expected  # `prefect deploy` had the auth string
        assert {client.read_work_pool(p).status for p in work_pools()} == {WorkPoolStatus.READY}  # so had the workers
    with (
        SyncPrefectClient(f"{record.prefect_url}/api") as anonymous,
        pytest.raises(PrefectHTTPStatusError, match="401"),
    ):
        anonymous.read_deployments()
    for service in record.services:  # the secrets travel in the environment, never on a command line
        for pid in group_members(service.pid):
            assert not any(s in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") for s in auth_services.secrets)
    worker = next(s for s in record.services if s.name.startswith("worker-"))
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{worker.pid}/environ").read_text().split("\0") if "=" in v)
    assert {k: environ.get(k) for k in AUTH_VARIABLES} == {k: env[k] for k in AUTH_VARIABLES}  # flows reach MLflow
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in environ and "PREFECT_SERVER_API_AUTH_STRING" not in environ


@slow
def test_up_auth_writes_the_secrets_nowhere(auth_services: AuthServices) -> None:
    state = Path(auth_services.env["FINETUNE_FLOWS_STATE_DIR"])
    config = state / "services" / "mlflow-auth.ini"
    assert config.stat().st_mode & 0o777 == 0o600
    assert "default_permission = READ" in config.read_text(encoding="utf-8")
    files = [p for p in state.rglob("*") if p.is_file()]
    assert {"services.json", "mlflow-server.log", "prefect-server.log", "deploy.log", "mlflow-auth.db"} <= {
        p.name for p in files
    }
    for secret in auth_services.secrets:
        assert [str(p) for p in files if secret.encode() in p.read_bytes()] == [], secret
        assert secret not in auth_services.up.stdout + auth_services.up.stderr


@slow
def test_up_auth_down_stops_everything(auth_services: AuthServices) -> None:
    record = read_record(auth_services.env)
    result = cli(auth_services.env, "down")
    assert result.returncode == 0 and result.stdout.startswith("stopped: prefect-server"), result.stdout
    assert [s.pid for s in record.services if group_members(s.pid)] == []
    assert not is_healthy(f"{record.prefect_url}/api/health") and not is_healthy(f"{record.mlflow_url}/health")
    assert cli(auth_services.env, "status").stdout == "not up\n"
