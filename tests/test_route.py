"""Flow ``route`` (customer-service messages -> intent and reply, or hand-off): against one tiny customer-service
version registered by the CLI for the whole module; the routing path without torch, the command's output, a bad
input file, formula-safe CSVs, and an unknown model or alias."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune_flows.plugins import ConfigError, DataError
from finetune_flows.tasks.classification.answers import Answer, read_answers
from finetune_flows.tasks.core.config import validated
from finetune_flows.tasks.routing.routing import (
    COLUMNS,
    HANDOFF_REPLY,
    RouteConfig,
    read_messages,
    route_file,
    route_messages,
    routes_of,
)
from tests.conftest import run_cli, services_environment
from tests.test_customer_service import MESSAGES, banking_csv

ROOT = Path(__file__).resolve().parents[1]
MODEL = "customer-service"
# Sentences of the training file (the model learnt some of them) and two it has never seen anything like.
TEXTS = [f"{text} ({n})" for texts in MESSAGES.values() for text in texts for n in (1, 40)] + [
    "what is the weather like in Lisbon",
    "I would like to order a pizza",
]
FORMULA = '=HYPERLINK("http://example.com/x","click")'


EXTRAS = ("intents-multilabel", "slots")
"""The optional models route adds; the module's state registers version 1 of each next to customer-service."""


@pytest.fixture(scope="module")
def registered(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness: str) -> dict[str, str]:
    """The environment of a state folder holding version 1 (tiny model, the champion) of customer-service and of the
    optional intents-multilabel and slots models (trained on their bundled NLU++ sample)."""
    folder = tmp_path_factory.mktemp("route")
    env = services_environment(folder / "state", prefect_harness)
    train = banking_csv(folder / "banking.csv", 72)  # 288 rows, as in test_customer_service
    runs = {MODEL: ["--data", str(train), "--set", "training.max_steps=30", "--set", "training.eval_every_steps=10"]}
    runs |= {name: ["--set", "training.max_steps=4", "--set", "training.eval_every_steps=2"] for name in EXTRAS}
    for scenario, options in runs.items():
        result = run_cli(
            env, "run", scenario, *options, "--set", f"model.source={tiny_model_dir}",
            "--set", "model.max_length=32", "--set", "training.learning_rate=5e-3", timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert "version          : 1" in result.stdout
    return env


@pytest.fixture
def in_state(registered: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process pointed at the registered state folder; MLflow's tracking URI restored afterwards."""
    monkeypatch.setenv("FINETUNE_FLOWS_STATE_DIR", registered["FINETUNE_FLOWS_STATE_DIR"])
    monkeypatch.delenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    yield Path(registered["FINETUNE_FLOWS_STATE_DIR"])
    mlflow.set_tracking_uri(previous)


def shipped(state: Path, tmp_path: Path) -> tuple[dict[str, Answer], dict[str, object], pd.DataFrame]:
    """(answers, hand-off policy, the served model's own output for TEXTS) of version 1, read independently."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{state / 'mlflow.db'}")
    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "served")))
        served = mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame({"text": TEXTS}))
    finally:
        mlflow.set_tracking_uri(previous)
    policy = json.loads((folder / "artifacts" / "handoff.json").read_text(encoding="utf-8"))
    return read_answers(folder / "artifacts" / "answers.csv"), policy, served


def messages_csv(path: Path, texts: list[str], column: str = "text") -> Path:
    pd.DataFrame({column: texts, "channel": "app"}).to_csv(path, index=False)
    return path


# -- without MLflow ---------------------------------------------------------------------------------------------


def test_routes_answer_sure_messages_and_hand_off_the_rest() -> None:
    answers = {"card_arrival": Answer("Cards arrive in 5 days.", "Cards"), "pin_blocked": Answer("Unblock it.")}
    served = pd.DataFrame(
        {"label": ["card_arrival", "handoff", "pin_blocked"], "intent": ["card_arrival", "pin_blocked", "pin_blocked"],
         "score": [0.9, 0.3, 0.8]}
    )  # fmt: skip
    routes = routes_of(["where is my card", "hm", "my pin"], served, answers, "handoff", "7")
    assert list(routes.columns) == COLUMNS
    assert routes["route"].tolist() == ["intent", "handoff", "intent"]
    assert routes["intent"].tolist() == ["card_arrival", "pin_blocked", "pin_blocked"]  # the closest, handed off
    assert routes["reply"].tolist() == ["Cards arrive in 5 days.", HANDOFF_REPLY, "Unblock it."]
    assert routes["link"].tolist() == ["Cards", "", ""] and set(routes["model_version"]) == {"7"}
    with pytest.raises(DataError, match=r"no reply template for intent\(s\) \['pin_blocked'\] in the model's"):
        routes_of(
            ["where is my card", "hm", "my pin"], served, {"card_arrival": answers["card_arrival"]}, "handoff", "7"
        )


def test_a_file_without_the_text_column_names_file_and_column(tmp_path: Path) -> None:
    path = messages_csv(tmp_path / "messages.csv", ["Where is my card"], column="message")
    found = r"missing column 'text'; columns found: \['message', 'channel'\]"
    with pytest.raises(DataError, match=rf"{found} \(file {re.escape(str(path))}, column 'text'\)\. Name the"):
        route_file(RouteConfig(source=str(path)))  # fails before any model is looked up
    assert read_messages(path, "message") == ["Where is my card"]
    empty = messages_csv(tmp_path / "empty.csv", ["Where is my card", " "])
    with pytest.raises(DataError, match=rf"empty message \(file {re.escape(str(empty))}, row 2, column 'text'"):
        read_messages(empty)


def test_the_output_must_be_csv_or_parquet() -> None:
    with pytest.raises(ConfigError, match=r"output_path: Value error, output_path must end in \.csv or \.parquet"):
        validated(RouteConfig, {"source": "m.csv", "output_path": "routes.xlsx"})


# -- against the registered version ------------------------------------------------------------------------------

NO_TORCH = """
import importlib.abc, json, sys

BLOCKED = ("torch", "transformers")
tried = []


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Blocker())
import finetune_flows.flows.route  # the flow module and everything it imports
from finetune_flows.tasks.routing.routing import RouteConfig, route_messages

routes, _ = route_messages(json.loads(sys.argv[1]), RouteConfig(source="messages.csv"))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"routes": routes.to_dict("records"), "loaded": loaded, "tried": sorted(set(tried))}))
"""


def test_route_runs_on_the_onnx_model_without_torch(registered: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, json.dumps(TEXTS)],
        cwd=ROOT, env=registered, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], out["tried"]
    routes = pd.DataFrame(out["routes"])
    assert list(routes.columns) == COLUMNS and routes["text"].tolist() == TEXTS

    answers, policy, served = shipped(Path(registered["FINETUNE_FLOWS_STATE_DIR"]), tmp_path)
    handed = served["score"] < policy["threshold"]
    assert (routes["route"] == "handoff").tolist() == handed.tolist()
    assert 0 < handed.sum() < len(TEXTS), "the tiny model should answer some messages and hand off others"
    assert routes["intent"].tolist() == served["intent"].tolist()
    assert routes["confidence"].tolist() == pytest.approx(served["score"].tolist())
    answered = routes[~handed.to_numpy()]
    assert answered["reply"].tolist() == [answers[i].reply for i in answered["intent"]]
    assert answered["link"].tolist() == [answers[i].link for i in answered["intent"]]
    assert set(routes.loc[handed.to_numpy(), "reply"]) == {HANDOFF_REPLY}
    assert set(routes.loc[handed.to_numpy(), "link"]) == {""} and set(routes["model_version"]) == {"1"}


def test_the_command_prints_intents_handoffs_and_replies(registered: dict[str, str], tmp_path: Path) -> None:
    source = messages_csv(tmp_path / "messages.csv", TEXTS)
    out_path = tmp_path / "routes.csv"
    result = run_cli(registered, "route", str(source), "--set", f"output_path={out_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    routes = pd.read_csv(out_path, dtype=str, keep_default_na=False)
    handoffs = int((routes["route"] == "handoff").sum())
    lines = result.stdout.splitlines()
    assert "=== finetune-flows: route complete ===" in lines
    routed_by = f"models:/{MODEL}/1, models:/intents-multilabel/1, models:/slots/1"
    assert lines[-1] == f"{len(TEXTS)} messages, {handoffs} handed off, routed by {routed_by} -> {out_path}"
    shown = [line for line in lines if line.startswith(("intent ", "handoff "))]
    assert len(shown) == 10 and f"... {len(TEXTS) - 10} more" in lines
    for line, row in zip(shown, routes.itertuples(), strict=False):
        route, confidence, intent = line.split()[:3]
        assert (route, float(confidence)) == (row.route, pytest.approx(float(str(row.confidence)), abs=5e-4))
        assert intent == (row.intent if row.route == "intent" else f"({row.intent})") and repr(row.text) in line
    replies = [line.strip() for line in lines if line.startswith(" " * 16 + "-> ")]
    assert replies == [
        f"-> {HANDOFF_REPLY}" if row.route == "handoff" else f"-> {row.reply} [{row.link}]"
        for row in routes.head(10).itertuples()
    ]
    assert {"intent", "handoff"} <= {line.split()[0] for line in shown}


def test_csv_routes_are_formula_safe_and_parquet_keeps_the_text(in_state: Path, tmp_path: Path) -> None:
    source = messages_csv(tmp_path / "formula.csv", ["Where is my new card (1)", FORMULA])
    result = route_file(RouteConfig(source=str(source)))
    path = Path(result.output_path)
    assert path.parent == in_state / "routes" and re.fullmatch(rf"{MODEL}-v1-\d{{8}}T\d{{6}}Z\.csv", path.name)
    assert pd.read_csv(path, dtype=str)["text"].tolist() == ["Where is my new card (1)", "'" + FORMULA]
    assert result.first[1].text == FORMULA and result.rows == 2  # the result carries the message as it came
    parquet = route_file(RouteConfig(source=str(source), output_path=str(tmp_path / "routes.parquet")))
    assert pd.read_parquet(parquet.output_path)["text"].tolist()[1] == FORMULA


def test_an_unknown_model_lists_the_registered_ones(registered: dict[str, str], in_state: Path) -> None:
    with pytest.raises(ConfigError, match=r"no version of registered model 'customer-service' has alias 'gold' in "
                       r"sqlite:///.*; its aliases: \['challenger', 'champion'\]"):  # fmt: skip
        route_messages(["Where is my card"], RouteConfig(source="m.csv", alias="gold"))
    result = run_cli(registered, "route", str(messages_csv(in_state.parent / "m.csv", TEXTS[:1])),
                     "--set", "model_name=customer-servcie")  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    assert re.search(
        r"finetune-flows: error: no registered model 'customer-servcie' in sqlite:///\S+; registered models: "
        r"\['customer-service', 'intents-multilabel', 'slots'\]\. Set model_name=<one of them>, or register one "
        r"with `finetune-flows run",
        result.stderr,
    ), result.stderr[-3000:]


# -- the optional multi-label intent and slot models ------------------------------------------------------


def test_route_adds_the_intents_and_slots_of_the_registered_models(registered: dict[str, str], tmp_path: Path) -> None:
    texts = ["I want to cancel my transfer of 20 pounds, it doesn't work", "where is my card (1)"]
    source = messages_csv(tmp_path / "messages.csv", texts)
    out_path = tmp_path / "routes.parquet"
    result = run_cli(registered, "route", str(source), "--set", f"output_path={out_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    routes = pd.read_parquet(out_path)
    assert list(routes.columns) == COLUMNS
    state = Path(registered["FINETUNE_FLOWS_STATE_DIR"])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{state / 'mlflow.db'}")
    try:  # each model's own served output, read independently of route
        served = {
            name: mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({"text": texts}))
            for name in EXTRAS
        }
    finally:
        mlflow.set_tracking_uri(previous)
    assert routes["intents"].tolist() == served["intents-multilabel"]["labels"].tolist()
    assert routes["slots"].tolist() == served["slots"]["slots"].tolist()
    assert all(isinstance(json.loads(s), list) for s in routes["slots"])
    routed_by = f"routed by models:/{MODEL}/1, models:/intents-multilabel/1, models:/slots/1 -> {out_path}"
    assert result.stdout.splitlines()[-1] == f"2 messages, {int((routes['route'] == 'handoff').sum())} handed off, " + (
        routed_by
    )
    shown = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("intents: ")]
    assert len(shown) == sum(bool(i) or s != "[]" for i, s in zip(routes["intents"], routes["slots"], strict=True))


def test_optional_models_left_out_named_or_not_registered(in_state: Path, tmp_path: Path) -> None:
    source = messages_csv(tmp_path / "messages.csv", ["Where is my new card (1)"])
    empty = route_file(RouteConfig(source=str(source), output_path=str(tmp_path / "r.parquet"), intents_model="",
                                   slots_model=""))  # fmt: skip
    routes = pd.read_parquet(empty.output_path)
    assert routes[["intents", "slots"]].to_dict("records") == [{"intents": "", "slots": ""}]
    assert empty.also_routed_by == []
    # Only customer-service has alias "gold": the default optional models are skipped, a named one is an error.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{in_state / 'mlflow.db'}")
    client.set_registered_model_alias(MODEL, "gold", "1")
    try:
        gold = route_file(RouteConfig(source=str(source), alias="gold", output_path=str(tmp_path / "g.parquet")))
        assert gold.also_routed_by == [] and pd.read_parquet(gold.output_path)["slots"].tolist() == [""]
        with pytest.raises(ConfigError, match=r"no version of registered model 'slots' has alias 'gold' in "
                           r"sqlite:///.*; its aliases: \['challenger', 'champion'\]"):  # fmt: skip
            route_file(RouteConfig(source=str(source), alias="gold", slots_model="slots"))
        with pytest.raises(ConfigError, match=r"no registered model 'slot' in sqlite:///.*; registered models: "
                           r"\[.*'slots'\]\. Set slots_model=<one of them>, or register one with `finetune-flows "
                           r"run slots`"):  # fmt: skip
            route_file(RouteConfig(source=str(source), slots_model="slot"))
    finally:
        client.delete_registered_model_alias(MODEL, "gold")
