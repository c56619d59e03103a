"""One way to change a setting: ``--set section.field=value`` pairs (and a deployment's or API call's partial
parameters) become a nested dict that the parameter model validates, on top of the scenario's defaults.

Also the small parsers the parameter models use (the label map) and ``validated``, which reports every
problem of a config at once as a ``ConfigError``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from finetune_flows.plugins import SCENARIOS, ConfigError


def known_scenario(value: str) -> str:
    """``value`` if a scenario plugin has that name; a ValueError listing the registered ones otherwise."""
    if value not in SCENARIOS.names():
        raise ValueError(f"unknown scenario {value!r}; registered scenarios: {SCENARIOS.names()}")
    return value


def scenario_defaults(scenario: str) -> dict[str, dict[str, Any]]:
    """A scenario's recommended values, by config section."""
    d = SCENARIOS.get(scenario).defaults
    return {
        "model": {"source": d.model, "max_length": d.max_length},
        "data": {"eval_fraction": d.eval_fraction, "test_fraction": d.test_fraction},
        "export": {"tolerance": d.parity_tolerance},
        "training": {
            "epochs": d.epochs,
            "batch_size": d.batch_size,
            "learning_rate": d.learning_rate,
            "warmup_ratio": d.warmup_ratio,
            "weight_decay": d.weight_decay,
            "layer_lr_decay": d.layer_lr_decay,
            "label_smoothing": d.label_smoothing,
            "eval_every_steps": d.eval_every_steps,
            "early_stopping_patience": d.early_stopping_patience,
        },
    }


def parse_label_map(text: str) -> dict[str, str]:
    """``"0:negative, 1:positive"`` -> ``{"0": "negative", "1": "positive"}``; a ValueError names a bad pair."""
    pairs: dict[str, str] = {}
    for pair in text.split(","):
        raw, sep, name = (part.strip() for part in pair.rpartition(":"))
        if not sep or not raw or not name:
            raise ValueError(f"expected raw:label pairs separated by commas, got {pair.strip()!r}")
        if pairs.get(raw, name) != name:
            raise ValueError(f"raw label {raw!r} is mapped twice ({pairs[raw]!r} and {name!r})")
        pairs[raw] = name
    return pairs


def format_label_map(pairs: dict[str, str]) -> str:
    """The canonical text form of a label map (what runs and versions record)."""
    return ",".join(f"{raw}:{name}" for raw, name in pairs.items())


def label_map_problem(pairs: dict[str, str], scenario: str) -> str | None:
    """Why ``pairs`` cannot map into ``scenario``'s labels (a target it does not know), or None."""
    allowed = sorted(set(SCENARIOS.get(scenario).label_names.values()))
    if not allowed:  # the scenario takes any label names
        return None
    for raw, name in pairs.items():
        if name not in allowed:
            return f"target {name!r} (of raw label {raw!r}) is not a label of scenario {scenario!r}; allowed: {allowed}"
    return None


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: dict[str, Any]) -> M:
    """``model`` built from ``values``; every problem reported at once as a ``ConfigError``."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            if err["loc"]
            else err["msg"]  # a check across fields names the fields itself
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["training.epochs=2", "data.eval_path=x.tsv"]`` -> a dict; values stay strings (pydantic converts)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = None if value.strip().lower() in {"", "none", "null"} else value.strip()
    return overrides
