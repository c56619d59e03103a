"""deployments/prefect.yaml: every deployment reaches a real flow by entrypoint, its parameters pass
both checks Prefect makes (the deployment's JSON schema on the server, the flow's pydantic model at
run time), the finetune deployments reproduce their scenario's defaults, and the shared work pool
and schedules come from the ``definitions`` block."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
SPEC: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
DEPLOYMENTS: dict[str, dict[str, Any]] = {d["name"]: d for d in SPEC["deployments"]}
FINETUNE_SCENARIOS = {
    "sentiment-finetune": "sentiment",
    "finance-finetune": "finance-monitoring",
    "recommendation-finetune": "recommendation",
    "customer-service-finetune": "customer-service",
    "intents-multilabel-finetune": "intents-multilabel",
    "slots-finetune": "slots",
}
RETRAIN_SCENARIOS = {"sentiment-retrain": "sentiment", "finance-retrain": "finance-monitoring"}
TRAIN_DEPLOYMENTS = {"sentiment-train", "finance-train", "recommendation-train"}


def load_flow(deployment: dict[str, Any]) -> Any:
    """The flow object behind a deployment's entrypoint, loaded by path as a worker loads it."""
    from prefect.flows import Flow, load_flow_from_entrypoint

    path, _, function = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file(), f"{deployment['name']}: entrypoint file {path} does not exist"
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{function}")
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is not a Prefect flow"
    return flow


def test_names_are_unique_and_expected() -> None:
    names = [d["name"] for d in SPEC["deployments"]]
    assert len(names) == len(set(names))
    assert set(names) == {
        "sentiment-finetune", "finance-finetune", "finance-monitor", *TRAIN_DEPLOYMENTS, *RETRAIN_SCENARIOS,
        "recommendation-finetune", "recommend", "customer-service-finetune", "route", "score",
        "intents-multilabel-finetune",
        "slots-finetune",
        "pretrain", "mlm-train",
        "sentiment-tune", "finance-label", "finance-watch-data",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(set(DEPLOYMENTS) - TRAIN_DEPLOYMENTS - {"mlm-train"}))
def test_parameters_validate_against_the_flow(name: str) -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    deployment = DEPLOYMENTS[name]
    flow = load_flow(deployment)
    parameters = deployment["parameters"]
    # What the server checks when a run is created from the deployment (enforce_parameter_schema) ...
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate(parameters, schema, raise_on_error=True)
    # ... and what the flow run itself does with them.
    validated = flow.validate_parameters(parameters)
    assert set(validated) == set(parameters)


@pytest.mark.parametrize(("name", "scenario"), sorted(FINETUNE_SCENARIOS.items()))
def test_finetune_parameters_reproduce_the_scenario_defaults(name: str, scenario: str) -> None:
    from finetune_flows.tasks.core.config import FinetuneConfig

    deployment = DEPLOYMENTS[name]
    assert deployment["entrypoint"] == "flows/finetune.py:finetune"
    config = FinetuneConfig.model_validate(deployment["parameters"]["config"])
    assert config == FinetuneConfig.for_scenario(scenario)


def test_monitor_runs_every_15_minutes() -> None:
    monitor = DEPLOYMENTS["finance-monitor"]
    assert monitor["entrypoint"] == "flows/monitor.py:monitor"
    intervals = [s["interval"] for s in monitor["schedules"] if "interval" in s and s.get("active", True)]
    assert [dt.timedelta(seconds=i) for i in intervals] == [dt.timedelta(minutes=15)]
    assert monitor["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def test_monitor_scores_the_model_that_finance_finetune_registers() -> None:
    from finetune_flows.tasks.core.config import FinetuneConfig

    finetune = FinetuneConfig.model_validate(DEPLOYMENTS["finance-finetune"]["parameters"]["config"])
    assert DEPLOYMENTS["finance-monitor"]["parameters"]["config"]["model_name"] == finetune.model_name


def test_route_answers_with_the_model_that_customer_service_finetune_registers() -> None:
    from finetune_flows.flows.route import route
    from finetune_flows.tasks.core.config import FinetuneConfig

    deployment = DEPLOYMENTS["route"]
    assert load_flow(deployment).name == route.name and deployment["work_pool"]["name"] == "cpu"
    finetune = FinetuneConfig.model_validate(DEPLOYMENTS["customer-service-finetune"]["parameters"]["config"])
    assert deployment["parameters"]["config"]["model_name"] == finetune.model_name


def test_work_pools_and_schedules_come_from_definitions() -> None:
    pools = SPEC["definitions"]["work_pools"]
    schedules = list(SPEC["definitions"]["schedules"].values())
    for deployment in SPEC["deployments"]:
        pool = deployment["work_pool"]
        assert pool["name"] in {p["name"] for p in pools.values()}, f"{deployment['name']}: unknown work pool"
        assert pool in pools.values(), f"{deployment['name']}: work pool not taken from definitions"
        for schedule in deployment.get("schedules") or []:
            assert schedule in schedules, f"{deployment['name']}: schedule not taken from definitions"


def test_runs_start_in_the_worker_directory() -> None:
    (step,) = SPEC["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}


@pytest.mark.parametrize("name", sorted(TRAIN_DEPLOYMENTS))
def test_train_deployments_run_the_training_stage_on_the_gpu_pool(name: str) -> None:
    from finetune_flows.flows.train import train_stage

    deployment = DEPLOYMENTS[name]
    flow = load_flow(deployment)
    assert flow.name == train_stage.name and deployment["entrypoint"] == "flows/train.py:train_stage"
    assert deployment["work_pool"]["name"] == "gpu"
    # Each run gets its TrainRequest from the finetune or retrain run that hands training over.
    assert "parameters" not in deployment


@pytest.mark.parametrize(("name", "scenario"), sorted(RETRAIN_SCENARIOS.items()))
def test_retrain_deployments_are_scheduled_and_hand_training_to_the_gpu_pool(name: str, scenario: str) -> None:
    from zoneinfo import ZoneInfo

    from finetune_flows.tasks.core.config import RetrainConfig

    deployment = DEPLOYMENTS[name]
    assert deployment["entrypoint"] == "flows/retrain.py:retrain"
    config = RetrainConfig.model_validate(deployment["parameters"]["config"])
    assert config.scenario == scenario
    flow_name, _, train_name = (config.infrastructure.train_on or "").partition("/")
    assert flow_name == "train" and DEPLOYMENTS[train_name]["work_pool"]["name"] == "gpu"
    assert DEPLOYMENTS[train_name]["tags"][1] == deployment["tags"][1]  # same scenario tag
    (schedule,) = deployment["schedules"]
    assert len(schedule["cron"].split()) == 5
    assert ZoneInfo(schedule["timezone"])  # a real IANA time zone
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_finance_retrain_triggers_match_what_monitor_and_label_emit() -> None:
    from datetime import timedelta

    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    from finetune_flows.flows.label import LabelConfig
    from finetune_flows.tasks.core.config import RetrainConfig
    from finetune_flows.tasks.labelling.arrivals import NEW_FILE_EVENT, WatchConfig
    from finetune_flows.tasks.labelling.asking import NEW_LABELS_EVENT
    from finetune_flows.tasks.monitoring.drift_check import DRIFT_EVENT
    from finetune_flows.tasks.monitoring.scoring import MonitorConfig

    retrain = RetrainConfig.model_validate(DEPLOYMENTS["finance-retrain"]["parameters"]["config"])
    label = LabelConfig.model_validate(DEPLOYMENTS["finance-label"]["parameters"]["config"])
    monitor = MonitorConfig.model_validate(DEPLOYMENTS["finance-monitor"]["parameters"]["config"])
    adapter = TypeAdapter(DeploymentTriggerTypes)
    triggers = {t["name"]: adapter.validate_python(t) for t in DEPLOYMENTS["finance-retrain"]["triggers"]}
    watch = WatchConfig.model_validate(DEPLOYMENTS["finance-watch-data"]["parameters"]["config"])
    drift, labels, spike = (triggers[f"finance-retrain on {n}"] for n in ("drift", "new data", "negative spike"))
    assert drift.expect == {DRIFT_EVENT} and labels.expect == {NEW_LABELS_EVENT, NEW_FILE_EVENT}
    assert {t.match.root["prefect.resource.id"] for t in (drift, labels)} == {f"model.{retrain.model_name}"}
    assert monitor.model_name == label.model_name == retrain.model_name
    assert drift.enabled and labels.enabled and not spike.enabled  # a spike retrains only when the team wants it
    assert all(
        t.posture == "Reactive" and t.threshold == 1 and t.within >= timedelta(hours=1) for t in triggers.values()
    )
    assert (label.data_folder, label.eval_path) == (retrain.data_folder, retrain.data.eval_path)
    assert (watch.data_folder, watch.model_name) == (retrain.data_folder, retrain.model_name)


def test_notification_automations_validate_and_point_at_the_users_block() -> None:
    from uuid import uuid4

    from finetune_flows.flows.cli.notifications import AUTOMATIONS_YAML, automation_specs

    block = uuid4()
    specs = automation_specs(AUTOMATIONS_YAML, block)
    assert [s.trigger.expect for s in specs] == [
        {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, {"finance.negative_spike"}, {"model.drift"},
    ]  # fmt: skip
    assert all(a.block_document_id == block for s in specs for a in s.actions)
