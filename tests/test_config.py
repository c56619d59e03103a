"""The finetune flow's parameter model: scenario defaults, overrides, bounds and its JSON schema."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from finetune_flows.plugins import HEADS, SCENARIOS, ConfigError
from finetune_flows.plugins.scenarios.sentiment import SentimentScenario
from finetune_flows.plugins.specs import ScenarioDefaults
from finetune_flows.tasks.core.config import FinetuneConfig, Precision, parse_overrides

# Where each field of ScenarioDefaults lands in FinetuneConfig.
DEFAULT_PATHS = {
    "model": ("model", "source"),
    "max_length": ("model", "max_length"),
    "learning_rate": ("training", "learning_rate"),
    "epochs": ("training", "epochs"),
    "batch_size": ("training", "batch_size"),
    "warmup_ratio": ("training", "warmup_ratio"),
    "weight_decay": ("training", "weight_decay"),
    "layer_lr_decay": ("training", "layer_lr_decay"),
    "label_smoothing": ("training", "label_smoothing"),
    "eval_every_steps": ("training", "eval_every_steps"),
    "early_stopping_patience": ("training", "early_stopping_patience"),
    "eval_fraction": ("data", "eval_fraction"),
    "test_fraction": ("data", "test_fraction"),
    "parity_tolerance": ("export", "tolerance"),
}


def _at(config: Any, path: tuple[str, str]) -> Any:
    section, field = path
    return getattr(getattr(config, section), field)


# -- scenario defaults and overrides ----------------------------------------------------------


def test_for_scenario_takes_every_scenario_default() -> None:
    defaults = SentimentScenario.defaults
    tune_only = {"search_space"}  # the tune flow's space (tests/test_tune.py), not a fine-tune field
    assert {f.name for f in dataclasses.fields(ScenarioDefaults)} - tune_only == set(DEFAULT_PATHS)

    config = FinetuneConfig.for_scenario("sentiment")

    assert config.scenario == "sentiment"
    for name, path in DEFAULT_PATHS.items():
        assert _at(config, path) == getattr(defaults, name), name


def test_scenario_defaults_differ_from_the_model_defaults() -> None:
    """Guards the test above: sentiment's defaults must not equal the plain field defaults,
    or taking them would be indistinguishable from ignoring them."""
    from types import SimpleNamespace

    from finetune_flows.tasks.core.config import DataConfig, ExportConfig, ModelConfig, TrainingConfig

    plain = SimpleNamespace(data=DataConfig(), model=ModelConfig(), training=TrainingConfig(), export=ExportConfig())
    defaults = SentimentScenario.defaults
    differing = [n for n, path in DEFAULT_PATHS.items() if _at(plain, path) != getattr(defaults, n)]
    assert differing


def test_head_defaults_to_the_scenarios_head() -> None:
    config = FinetuneConfig.for_scenario("sentiment")
    assert config.head is None
    assert config.head_name == SentimentScenario.head


def test_string_overrides_are_converted() -> None:
    overrides = parse_overrides(
        [
            "training.epochs=2",
            "training.batch_size = 8",
            "training.precision=fp32",
            "data.max_train_rows=100",
            "data.eval_path=none",
            "registration.model_name=reviews",
        ]
    )
    assert overrides["training.epochs"] == "2"  # parse_overrides leaves conversion to pydantic

    config = FinetuneConfig.for_scenario("sentiment", overrides)

    assert config.training.epochs == 2.0 and isinstance(config.training.epochs, float)
    assert config.training.batch_size == 8 and isinstance(config.training.batch_size, int)
    assert config.training.precision is Precision.FP32
    assert config.data.max_train_rows == 100
    assert config.data.eval_path is None
    assert config.model_name == "reviews"
    # Fields not overridden keep the scenario's defaults.
    assert config.training.learning_rate == SentimentScenario.defaults.learning_rate
    assert config.model.max_length == SentimentScenario.defaults.max_length


def test_parse_overrides_reads_null_words_as_none() -> None:
    assert parse_overrides(["a.b=", "a.c=None", "a.d=null", "a.e=x=y"]) == {
        "a.b": None,
        "a.c": None,
        "a.d": None,
        "a.e": "x=y",
    }


@pytest.mark.parametrize("pair", ["noequals", "=5", "  =5"])
def test_parse_overrides_rejects_a_pair_without_key(pair: str) -> None:
    with pytest.raises(ConfigError, match=rf"--set expects key=value, got {re.escape(repr(pair))}"):
        parse_overrides([pair])


def test_override_into_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"training\.epochs: Input should be a valid number \(got \{'x': '1'\}\)"):
        FinetuneConfig.for_scenario("sentiment", {"training.epochs.x": "1"})


# -- plugin names ----------------------------------------------------------------------------


def test_unknown_scenario_is_rejected_listing_registered_names() -> None:
    listed = re.escape(str(SCENARIOS.names()))
    assert "sentiment" in SCENARIOS.names()

    with pytest.raises(ConfigError, match=rf"unknown scenario 'nope'; registered scenarios: {listed}"):
        FinetuneConfig.for_scenario("nope")
    with pytest.raises(ValidationError, match=rf"unknown scenario 'nope'; registered scenarios: {listed}"):
        FinetuneConfig(scenario="nope")


def test_unknown_head_is_rejected_listing_registered_names() -> None:
    listed = re.escape(str(HEADS.names()))
    assert "sequence-classification" in HEADS.names()

    with pytest.raises(ConfigError, match=rf"head: .*unknown head 'nope'; registered heads: {listed}"):
        FinetuneConfig.for_scenario("sentiment", {"head": "nope"})


def test_known_head_is_accepted() -> None:
    config = FinetuneConfig.for_scenario("sentiment", {"head": "sequence-classification"})
    assert config.head_name == "sequence-classification"


# -- bounds, unknown keys, immutability ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("training.learning_rate", "0"),
        ("export.parity_samples", "10"),
        ("data.eval_fraction", "0.7"),
        ("model.max_length", "4096"),
        ("training.epochs", "-1"),
    ],
)
def test_out_of_bounds_value_names_field_and_value(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: .*\(got '{re.escape(value)}'\)"):
        FinetuneConfig.for_scenario("sentiment", {key: value})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.for_scenario("sentiment", {"training.learning_rate": "0", "export.opset": "99"})
    assert "training.learning_rate" in str(info.value)
    assert "export.opset" in str(info.value)


@pytest.mark.parametrize("key", ["training.epoch", "nonsense", "export.format"])
def test_unknown_key_is_rejected(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Extra inputs are not permitted"):
        FinetuneConfig.for_scenario("sentiment", {key: "1"})


def test_config_is_frozen() -> None:
    config = FinetuneConfig.for_scenario("sentiment")
    with pytest.raises(ValidationError, match="frozen"):
        config.training.epochs = 3.0
    with pytest.raises(ValidationError, match="frozen"):
        config.scenario = "other"
    assert config.training.epochs == SentimentScenario.defaults.epochs


def test_config_round_trips_through_json() -> None:
    """Prefect passes the config as JSON parameters; it must come back equal."""
    config = FinetuneConfig.for_scenario("sentiment", {"training.epochs": "2", "data.train_path": "t.tsv"})
    assert FinetuneConfig.model_validate_json(config.model_dump_json()) == config


# -- the JSON schema behind the Prefect run form ---------------------------------------------


def _schema_problems(schema: dict[str, Any]) -> list[str]:
    """Properties without a description, and objects a form cannot render field by field."""
    defs = schema.get("$defs", {})
    problems: list[str] = []

    def described(prop: dict[str, Any]) -> bool:
        if prop.get("description"):
            return True
        # A bare reference to a sub-model is described by that sub-model's docstring.
        ref = prop.get("$ref")
        return bool(ref and defs[ref.rsplit("/", 1)[-1]].get("description"))

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and not node.get("properties"):
                problems.append(f"{where}: object without properties")
            if node.get("additionalProperties") not in (None, False):
                problems.append(f"{where}: free-form additionalProperties")
            for name, prop in node.get("properties", {}).items():
                if not described(prop):
                    problems.append(f"{where}.{name}: no description")
                if not ({"type", "$ref", "anyOf", "allOf", "enum", "const"} & set(prop)):
                    problems.append(f"{where}.{name}: no type (Any)")
            for key, child in node.items():
                if key != "$defs":
                    walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}[{index}]")

    walk({k: v for k, v in schema.items() if k != "$defs"}, schema.get("title", "root"))
    for name, sub in defs.items():
        walk(sub, name)
    return problems


def test_schema_describes_every_property_and_has_no_free_form_objects() -> None:
    schema = FinetuneConfig.model_json_schema()
    # Every section is its own definition, so walking $defs reaches every field.
    assert {"DataConfig", "ModelConfig", "TrainingConfig", "ExportConfig"} <= set(schema["$defs"])

    assert _schema_problems(schema) == []


def test_schema_check_catches_what_it_guards_against() -> None:
    class Inner(BaseModel):
        undocumented: int = 1
        options: dict[str, Any] = Field(default_factory=dict, description="Free-form.")
        anything: Any = Field(default=None, description="Untyped.")

    class Outer(BaseModel):
        inner: Inner = Field(default_factory=Inner)

    problems = _schema_problems(Outer.model_json_schema())

    assert "Outer.inner: no description" in problems  # Inner has no docstring
    assert "Inner.undocumented: no description" in problems
    assert "Inner/properties/options: object without properties" in problems
    assert "Inner/properties/options: free-form additionalProperties" in problems
    assert "Inner.anything: no type (Any)" in problems


def test_a_partial_config_takes_the_scenarios_defaults() -> None:
    """A deployment or API call that names only the scenario gets that scenario's defaults."""
    from finetune_flows.plugins.scenarios.finance import FinanceScenario

    partial = FinetuneConfig.model_validate({"scenario": "finance-monitoring", "training": {"epochs": 2}})
    defaults = FinanceScenario.defaults
    assert partial.training.epochs == 2  # given
    assert partial.training.learning_rate == defaults.learning_rate  # not given: the scenario's
    assert partial.data.test_fraction == defaults.test_fraction
    assert partial.model.max_length == defaults.max_length
    assert partial == FinetuneConfig.for_scenario("finance-monitoring", {"training.epochs": "2"})


def test_one_config_serves_a_ranking_scenario_with_its_own_defaults() -> None:
    config = FinetuneConfig.for_scenario("recommendation", {"ranking.negatives": "49"})
    assert config.head_name == "bi-encoder" and config.primary_metric == "ndcg_at_10"
    assert (config.model.max_length, config.training.warmup_ratio, config.ranking.negatives) == (64, 0.1, 49)


def test_infrastructure_settings_have_their_own_section() -> None:
    config = FinetuneConfig.for_scenario("sentiment", {"infrastructure.train_on": "train/sentiment-train"})
    assert config.infrastructure.train_on == "train/sentiment-train" and config.infrastructure.processes == 1
    with pytest.raises(ConfigError, match=r"training\.train_on: Extra inputs are not permitted"):
        FinetuneConfig.for_scenario("sentiment", {"training.train_on": "train/sentiment-train"})


def test_a_scenario_can_loosen_the_parity_gate_and_a_user_can_override_it() -> None:
    assert FinetuneConfig.for_scenario("slots").export.tolerance == 3e-4  # per-token logits (plugins/scenarios/slots)
    assert FinetuneConfig.for_scenario("sentiment").export.tolerance == 1e-4
    assert FinetuneConfig.for_scenario("slots", {"export.tolerance": 1e-4}).export.tolerance == 1e-4
