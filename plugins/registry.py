"""A small typed registry over ``importlib.metadata`` entry points.

Built-in heads and scenarios register through this project's own pyproject entry points,
exactly like third-party plugins. Lookup is lazy: ``names()`` reads entry-point metadata only;
``get(name)`` imports, validates and instantiates that one plugin. A miss lists what exists; a
broken plugin fails with its name and the cause; listing skips a broken plugin with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar, cast

from finetune_flows.plugins.errors import PluginError
from finetune_flows.plugins.specs import ExtraStage, Scenario, StageHook, TaskHead

logger = logging.getLogger(__name__)

API_VERSION = 2
"""The plugin API version this core speaks; a plugin declaring another one is refused."""

_NAME = re.compile(r"^[a-z][a-z0-9-]{1,62}$")

T = TypeVar("T")


class Registry(Generic[T]):
    """Plugins of one kind (``group`` is the entry-point group), looked up by name."""

    def __init__(self, group: str, kind: str, protocol: type, required: tuple[str, ...]) -> None:
        self.group = group
        self.kind = kind
        self._protocol = protocol
        self._required = required
        self._loaded: dict[str, T] = {}
        self._manual: dict[str, Callable[[], T]] = {}

    # -- discovery -------------------------------------------------------------------------
    def _entry_points(self) -> dict[str, list[EntryPoint]]:
        found: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=self.group):
            same = found.setdefault(ep.name, [])
            if all(other.value != ep.value for other in same):
                same.append(ep)
        return found

    def _entry_point(self, name: str) -> EntryPoint | None:
        """The one entry point called ``name``; two different targets under one name are an error."""
        candidates = self._entry_points().get(name, [])
        if len(candidates) > 1:
            raise PluginError(
                f"{self.kind} name {name!r} is registered twice: by {candidates[0].value} "
                f"and by {candidates[1].value}; uninstall one of them"
            )
        return candidates[0] if candidates else None

    def names(self) -> list[str]:
        """Registered names, sorted; imports nothing."""
        return sorted(set(self._entry_points()) | set(self._manual))

    # -- registration ----------------------------------------------------------------------
    def register(self, factory: Callable[[], T], *, name: str | None = None) -> T:
        """Register a plugin class (or factory) in-process; validates it now, not at first use."""
        plugin = self._validate(factory(), expected_name=name)
        plugin_name = cast(str, getattr(plugin, "name"))  # noqa: B009
        if plugin_name in self._entry_points() or plugin_name in self._manual:
            existing = self._entry_points().get(plugin_name)
            if existing:
                where = " and ".join(ep.value for ep in existing)
            else:
                first = type(self._loaded[plugin_name])
                where = f"{first.__module__}.{first.__qualname__}"
            raise PluginError(
                f"{self.kind} name {plugin_name!r} is already registered by {where}; "
                f"cannot register {type(plugin).__module__}.{type(plugin).__qualname__} too"
            )
        self._manual[plugin_name] = factory
        self._loaded[plugin_name] = plugin
        return plugin

    def unregister(self, name: str) -> None:
        """Remove an in-process registration (entry points cannot be removed at run time)."""
        self._manual.pop(name, None)
        self._loaded.pop(name, None)

    # -- lookup ----------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The plugin called ``name``; raises ``PluginError`` naming what exists on a miss."""
        if name in self._loaded:
            return self._loaded[name]
        ep = self._entry_point(name)
        if ep is None:
            raise PluginError(
                f"unknown {self.kind} {name!r}. Currently registered {self.kind} names are: {self.names()}"
            )
        try:
            factory = ep.load()
            plugin = factory()
        except Exception as exc:
            raise PluginError(
                f"{self.kind} plugin {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        self._loaded[name] = self._validate(plugin, expected_name=name, source=ep.value)
        return self._loaded[name]

    def available(self) -> dict[str, T]:
        """Every plugin that loads; a broken one is skipped with a warning naming it."""
        plugins: dict[str, T] = {}
        for name in self.names():
            try:
                plugins[name] = self.get(name)
            except PluginError as exc:
                logger.warning("skipping %s: %s", name, exc)
        return plugins

    # -- validation ------------------------------------------------------------------------
    def _validate(self, plugin: object, *, expected_name: str | None, source: str = "") -> T:
        label = f"{self.kind} plugin {expected_name or type(plugin).__qualname__!r}"
        if source:
            label += f" ({source})"
        problems = [f"missing attribute {attr!r}" for attr in self._required if not hasattr(plugin, attr)]
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"name {name!r} must be lowercase letters, digits and '-'")
        elif expected_name is not None and name != expected_name:
            problems.append(f"name {name!r} differs from its entry point name {expected_name!r}")
        version = getattr(plugin, "api_version", None)
        if version != API_VERSION:
            problems.append(f"api_version {version!r} is not the supported {API_VERSION}")
        problems += [
            f"extra stage {stage!r} needs a 'module:function' target and a StageHook"
            for stage in getattr(plugin, "extra_stages", ())
            if not (
                isinstance(stage, ExtraStage) and stage.target.count(":") == 1 and isinstance(stage.hook, StageHook)
            )
        ]
        if not problems and not isinstance(plugin, self._protocol):
            problems.append(f"does not satisfy the {self._protocol.__name__} protocol")
        if problems:
            raise PluginError(f"{label} is invalid: " + "; ".join(problems))
        return cast(T, plugin)


HEADS: Registry[TaskHead] = Registry(
    "finetune_flows.heads",
    "head",
    TaskHead,
    (
        "api_version",
        "name",
        "description",
        "label_kind",
        "text_columns",
        "evaluator",
        "serving_entry",
        "build_model",
        "predict",
        "tokenize",
        "collator",
        "trainer_options",
        "save_trained",
        "export_output",
        "export_module",
        "export_metadata",
    ),
)
SCENARIOS: Registry[Scenario] = Registry(
    "finetune_flows.scenarios",
    "scenario",
    Scenario,
    (
        "api_version",
        "name",
        "description",
        "head",
        "layouts",
        "label_names",
        "primary_metric",
        "defaults",
        "sample",
        "read_file",
        "taxonomy",
        "extra_stages",
    ),
)
