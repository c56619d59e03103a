"""The plugin registry: registration, validation, lookup, broken plugins and the built-ins.

Every test that registers or fakes plugins uses its own ``Registry`` instance, so nothing leaks
into the global ``HEADS``/``SCENARIOS``. Entry points are faked by monkeypatching
``plugins.registry.entry_points`` with real ``EntryPoint`` objects that point at small modules
written to ``tmp_path``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import finetune_flows.plugins.registry as registry_module
from finetune_flows.flows.cli.main import main
from finetune_flows.plugins import API_VERSION, HEADS, SCENARIOS, PluginError, Registry
from finetune_flows.plugins.heads.sequence_classification import SequenceClassificationHead
from finetune_flows.plugins.scenarios.sentiment import SentimentScenario
from finetune_flows.plugins.specs import LabelKind, Scenario, ScenarioBase, TaskHead

TEST_GROUP = "finetune_flows_test.heads"


class ToyHead:
    """A valid head that needs nothing heavy."""

    api_version: ClassVar[int] = API_VERSION
    name: ClassVar[str] = "toy-head"
    description: ClassVar[str] = "A toy head for tests."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = "finetune_flows.tasks.classification.evaluation:ClassificationEvaluator"
    serving_entry: ClassVar[str] = "finetune_flows.tasks.serving.classifier_model"
    export_output: ClassVar[str] = "logits"

    def build_model(self, source: str, id2label: dict[int, str]) -> Any:
        return None

    def predict(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return logits.argmax(axis=-1), logits

    def tokenize(self, tokenizer: Any, batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
        return {}

    def collator(self, tokenizer: Any) -> Any:
        return None

    def trainer_options(self) -> dict[str, Any]:
        return {}

    def save_trained(self, model: Any, source_dir: Path, out_dir: Path) -> None:
        return None

    def export_module(self, model_dir: Path) -> Any:
        return None

    def export_metadata(self, model_dir: Path) -> dict[str, str]:
        return {}


class RivalToyHead(ToyHead):
    """Another class that claims the name ``toy-head``."""


class FutureHead(ToyHead):
    name: ClassVar[str] = "future-head"
    api_version: ClassVar[int] = API_VERSION + 1


class NoPredictHead:
    api_version: ClassVar[int] = API_VERSION
    name: ClassVar[str] = "no-predict"
    description: ClassVar[str] = "Forgot to implement predict."
    label_kind: ClassVar[LabelKind] = LabelKind.CATEGORICAL
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    evaluator: ClassVar[str] = ToyHead.evaluator
    serving_entry: ClassVar[str] = ToyHead.serving_entry
    export_output: ClassVar[str] = "logits"
    build_model = ToyHead.build_model
    tokenize = ToyHead.tokenize
    collator = ToyHead.collator
    trainer_options = ToyHead.trainer_options
    save_trained = ToyHead.save_trained
    export_module = ToyHead.export_module
    export_metadata = ToyHead.export_metadata


class BadNameHead(ToyHead):
    name: ClassVar[str] = "Bad_Name"


def new_registry(group: str = TEST_GROUP) -> Registry[TaskHead]:
    """A head registry with the same protocol and required attributes as ``HEADS``."""
    return Registry(group, "head", TaskHead, HEADS._required)


# -- fake entry points -----------------------------------------------------------------------

_HEAD_CLASS = """
class Thing:
    api_version = 2
    name = {name!r}
    description = "written by the test"
    label_kind = "categorical"
    text_columns = ("text",)
    evaluator = "finetune_flows.tasks.classification.evaluation:ClassificationEvaluator"
    serving_entry = "finetune_flows.tasks.serving.classifier_model"
    export_output = "logits"

    def build_model(self, source, id2label):
        return None

    def predict(self, logits):
        return logits, logits

    def tokenize(self, tokenizer, batch, max_length):
        return {{}}

    def collator(self, tokenizer):
        return None

    def trainer_options(self):
        return {{}}

    def save_trained(self, model, source_dir, out_dir):
        return None

    def export_module(self, model_dir):
        return None

    def export_metadata(self, model_dir):
        return {{}}
"""

_MODULES = {
    "ffx_good_head": _HEAD_CLASS.format(name="good-head"),
    "ffx_old_api": _HEAD_CLASS.format(name="old-api").replace("api_version = 2", "api_version = 0"),
    "ffx_import_fails": 'raise RuntimeError("libcuda.so not found")\n',
    "ffx_init_fails": _HEAD_CLASS.format(name="init-fails")
    + """
    def __init__(self):
        raise ValueError("weights file missing")
""",
}


@pytest.fixture
def fake_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    """Entry points in ``TEST_GROUP``: a good head, one whose module raises on import, one whose
    class raises in ``__init__`` and one of an older API version.
    Their modules are removed from sys.modules afterwards."""
    for module, source in _MODULES.items():
        (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint(name="good-head", value="ffx_good_head:Thing", group=TEST_GROUP),
        EntryPoint(name="import-fails", value="ffx_import_fails:Thing", group=TEST_GROUP),
        EntryPoint(name="init-fails", value="ffx_init_fails:Thing", group=TEST_GROUP),
        EntryPoint(name="old-api", value="ffx_old_api:Thing", group=TEST_GROUP),
    ]

    def fake(*, group: str) -> list[EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(registry_module, "entry_points", fake)
    yield eps
    for module in _MODULES:
        sys.modules.pop(module, None)


# -- registration ----------------------------------------------------------------------------


def test_valid_plugin_registers_and_is_found_by_name() -> None:
    registry = new_registry()
    assert registry.names() == []

    registered = registry.register(ToyHead)

    assert isinstance(registered, ToyHead)
    assert registry.names() == ["toy-head"]
    assert registry.get("toy-head") is registered
    assert registry.available() == {"toy-head": registered}


def test_register_with_explicit_name_must_match_the_plugin_name() -> None:
    registry = new_registry()
    with pytest.raises(PluginError, match=r"name 'toy-head' differs from .* name 'other-name'"):
        registry.register(ToyHead, name="other-name")
    assert registry.names() == []


def test_duplicate_name_is_refused_naming_both() -> None:
    registry = new_registry()
    original = registry.register(ToyHead)

    with pytest.raises(PluginError, match=r"'toy-head' is already registered by .*ToyHead.*RivalToyHead"):
        registry.register(RivalToyHead)

    assert registry.get("toy-head") is original


def test_duplicate_of_a_same_named_class_names_both_modules() -> None:
    vendor_a = type("Head", (ToyHead,), {"__module__": "vendor_a.heads"})
    vendor_b = type("Head", (ToyHead,), {"__module__": "vendor_b.heads"})
    registry = new_registry()
    registry.register(vendor_a)

    with pytest.raises(PluginError, match=r"already registered by vendor_a\.heads.Head; .*vendor_b\.heads.Head"):
        registry.register(vendor_b)


def test_duplicate_of_an_entry_point_name_is_refused_naming_both() -> None:
    class ImpostorHead(ToyHead):
        name: ClassVar[str] = "sequence-classification"

    registry = new_registry(HEADS.group)  # sees the real entry points, registers nothing globally
    with pytest.raises(
        PluginError,
        match=r"'sequence-classification' is already registered by "
        r"finetune_flows\.plugins\.heads\.sequence_classification:SequenceClassificationHead.*ImpostorHead",
    ):
        registry.register(ImpostorHead)
    assert isinstance(registry.get("sequence-classification"), SequenceClassificationHead)


def test_unregister_removes_an_in_process_plugin() -> None:
    registry = new_registry()
    registry.register(ToyHead)

    registry.unregister("toy-head")

    assert registry.names() == []
    with pytest.raises(PluginError, match="unknown head 'toy-head'"):
        registry.get("toy-head")
    registry.register(RivalToyHead)  # the name is free again
    assert isinstance(registry.get("toy-head"), RivalToyHead)


def test_wrong_api_version_is_refused_at_registration() -> None:
    registry = new_registry()
    with pytest.raises(
        PluginError,
        match=rf"'FutureHead'.*api_version {API_VERSION + 1} is not the supported {API_VERSION}",
    ):
        registry.register(FutureHead)
    assert registry.names() == []


def test_missing_method_is_refused_at_registration() -> None:
    registry = new_registry()
    with pytest.raises(PluginError, match=r"'NoPredictHead' is invalid: missing attribute 'predict'"):
        registry.register(NoPredictHead)  # type: ignore[arg-type]  # the point of the test
    assert registry.names() == []


def test_bad_name_is_refused_at_registration() -> None:
    registry = new_registry()
    with pytest.raises(PluginError, match=r"name 'Bad_Name' must be lowercase letters, digits and '-'"):
        registry.register(BadNameHead)
    assert registry.names() == []


def test_scenario_missing_its_head_is_refused() -> None:
    class HeadlessScenario(ScenarioBase):
        api_version: ClassVar[int] = API_VERSION
        name: ClassVar[str] = "headless"
        description: ClassVar[str] = "Has no head."
        primary_metric: ClassVar[str] = "accuracy"

    registry: Registry[Scenario] = Registry(
        "finetune_flows_test.scenarios", "scenario", SCENARIOS._protocol, SCENARIOS._required
    )
    with pytest.raises(PluginError, match=r"scenario plugin '.*HeadlessScenario' is invalid: missing attribute 'head'"):
        registry.register(HeadlessScenario)  # type: ignore[arg-type]  # the point of the test


# -- lookup through entry points -------------------------------------------------------------


def test_unknown_name_lists_registered_names(fake_entry_points: list[EntryPoint]) -> None:
    registry = new_registry()
    registry.register(ToyHead)

    expected = re.escape("['good-head', 'import-fails', 'init-fails', 'old-api', 'toy-head']")
    with pytest.raises(PluginError, match=rf"unknown head 'nope'\. Currently registered head names are: {expected}"):
        registry.get("nope")


def test_names_imports_no_plugin_module(fake_entry_points: list[EntryPoint]) -> None:
    registry = new_registry()

    assert registry.names() == ["good-head", "import-fails", "init-fails", "old-api"]
    assert not set(_MODULES) & set(sys.modules)


def test_entry_point_plugin_loads_by_name(fake_entry_points: list[EntryPoint]) -> None:
    registry = new_registry()

    head = registry.get("good-head")

    assert type(head).__module__ == "ffx_good_head"
    assert head.name == "good-head"
    assert registry.get("good-head") is head  # instantiated once


def test_plugin_whose_module_raises_on_import_fails_with_name_and_cause(
    fake_entry_points: list[EntryPoint],
) -> None:
    registry = new_registry()
    with pytest.raises(
        PluginError,
        match=r"head plugin 'import-fails' \(ffx_import_fails:Thing\) failed to load: "
        r"RuntimeError: libcuda\.so not found",
    ) as info:
        registry.get("import-fails")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_plugin_whose_class_raises_in_init_fails_with_name_and_cause(
    fake_entry_points: list[EntryPoint],
) -> None:
    registry = new_registry()
    with pytest.raises(
        PluginError,
        match=r"head plugin 'init-fails' \(ffx_init_fails:Thing\) failed to load: "
        r"ValueError: weights file missing",
    ) as info:
        registry.get("init-fails")
    assert isinstance(info.value.__cause__, ValueError)


def test_entry_point_plugin_of_another_api_version_is_refused(fake_entry_points: list[EntryPoint]) -> None:
    registry = new_registry()
    with pytest.raises(
        PluginError,
        match=rf"head plugin 'old-api' \(ffx_old_api:Thing\) is invalid: "
        rf"api_version 0 is not the supported {API_VERSION}",
    ):
        registry.get("old-api")


def test_available_skips_broken_plugins_with_a_warning(
    fake_entry_points: list[EntryPoint], caplog: pytest.LogCaptureFixture
) -> None:
    registry = new_registry()
    toy = registry.register(ToyHead)
    caplog.set_level(logging.WARNING, logger="finetune_flows.plugins.registry")

    found = registry.available()

    assert sorted(found) == ["good-head", "toy-head"]
    assert found["toy-head"] is toy
    warnings = [
        r for r in caplog.records if r.name == "finetune_flows.plugins.registry" and r.levelno == logging.WARNING
    ]
    messages = sorted(r.getMessage() for r in warnings)
    assert len(messages) == 3
    assert re.search(r"skipping import-fails: .*RuntimeError: libcuda\.so not found", messages[0])
    assert re.search(r"skipping init-fails: .*ValueError: weights file missing", messages[1])
    assert re.search(r"skipping old-api: .*api_version 0 is not the supported", messages[2])


# -- the built-ins ---------------------------------------------------------------------------


def test_builtins_are_declared_as_entry_points() -> None:
    heads = {ep.name: ep.value for ep in entry_points(group=HEADS.group)}
    scenarios = {ep.name: ep.value for ep in entry_points(group=SCENARIOS.group)}

    assert heads["sequence-classification"] == (
        "finetune_flows.plugins.heads.sequence_classification:SequenceClassificationHead"
    )
    assert scenarios["sentiment"] == "finetune_flows.plugins.scenarios.sentiment:SentimentScenario"


def test_builtins_load_from_the_real_entry_points() -> None:
    heads: Registry[TaskHead] = Registry(HEADS.group, HEADS.kind, HEADS._protocol, HEADS._required)
    scenarios: Registry[Scenario] = Registry(SCENARIOS.group, SCENARIOS.kind, SCENARIOS._protocol, SCENARIOS._required)

    assert "sequence-classification" in heads.names()
    assert "sentiment" in scenarios.names()
    head = heads.get("sequence-classification")
    scenario = scenarios.get("sentiment")
    assert isinstance(head, SequenceClassificationHead)
    assert isinstance(scenario, SentimentScenario)
    assert scenario.head in heads.names()  # the built-in scenario's head exists
    assert heads._manual == {} and scenarios._manual == {}  # found through metadata, not register()


# -- the command line ------------------------------------------------------------------------


def _assert_lists_builtins(out: str) -> None:
    rows = [line.split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    assert ["sequence-classification", SequenceClassificationHead.description] in rows
    assert ["sentiment", SentimentScenario.description] in rows
    assert "heads (finetune_flows.heads):" in out
    assert "scenarios (finetune_flows.scenarios):" in out


def test_cli_plugins_lists_builtins_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    _assert_lists_builtins(capsys.readouterr().out)


def test_cli_plugins_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from finetune_flows.flows.cli.main import main; main(['plugins']); print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    _assert_lists_builtins(result.stdout)
    assert result.stdout.splitlines()[-1] == "False"


def test_two_packages_claiming_one_name_fail_that_name_only(monkeypatch, caplog) -> None:
    """A name registered by two different targets is an error naming both; listing skips only that name."""
    from importlib.metadata import EntryPoint

    import finetune_flows.plugins.registry as registry_module
    from finetune_flows.plugins import PluginError, Registry
    from finetune_flows.plugins.specs import TaskHead

    group = "test.clash"
    good = "finetune_flows.plugins.heads.sequence_classification:SequenceClassificationHead"
    points = [
        EntryPoint(name="clash", value="vendor_a.heads:Head", group=group),
        EntryPoint(name="clash", value="vendor_b.heads:Head", group=group),
        EntryPoint(name="sequence-classification", value=good, group=group),
    ]
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [p for p in points if p.group == group])
    registry: Registry[TaskHead] = Registry(group, "head", TaskHead, ("name", "predict"))
    assert registry.names() == ["clash", "sequence-classification"]
    with pytest.raises(PluginError, match=r"'clash' is registered twice: by vendor_a.heads:Head and by vendor_b"):
        registry.get("clash")
    with caplog.at_level("WARNING"):
        assert list(registry.available()) == ["sequence-classification"]
    assert "registered twice" in caplog.text
