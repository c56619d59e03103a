"""``finetune-flows run [SCENARIO] --help``: every parameter field with its type, default, bounds and description,
generated from the parameter model (the scenario's defaults when a scenario is named). Imports no flow."""

from __future__ import annotations

import argparse
import sys
import textwrap
import types
import typing
from enum import Enum
from typing import Any


def _type_name(annotation: Any) -> str:
    """``str | None`` -> "str | None"; an Enum -> its values joined with "|"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "|".join(str(member.value) for member in annotation)
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    """A field's constraints from its pydantic metadata: ``> 0.0, <= 100.0``, lengths, pattern."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <="}
    found = [f"{sign} {getattr(m, key)}" for m in metadata for key, sign in signs.items() if hasattr(m, key)]
    found += [f"pattern {m.pattern}" for m in metadata if getattr(m, "pattern", None)]
    return ", ".join(found)


def config_fields_help(scenario: str | None) -> str:
    """Every field of the run's parameter model: name, type, default (the scenario's, when one is named), bounds and
    description; generated from ``FinetuneConfig`` so it cannot drift."""
    from pydantic import BaseModel

    from finetune_flows.tasks.core.config import FinetuneConfig

    values = FinetuneConfig.for_scenario(scenario).model_dump(mode="json") if scenario else None
    whose = f"scenario {scenario!r}" if scenario else "the model; a scenario replaces some (`run <scenario> --help`)"
    lines = [f"config fields (set with --set section.field=value; defaults of {whose}):"]

    def describe(name: str, field: Any, default: Any) -> None:
        value = default.value if isinstance(default, Enum) else default
        facts = [_type_name(field.annotation), f"default {value!r}" if value is not None else "default: empty"]
        if bounds := _bounds(field.metadata):
            facts.append(bounds)
        lines.append(f"  {name}  ({'; '.join(facts)})")
        lines.extend(
            textwrap.wrap(field.description or "", width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )

    for name, field in FinetuneConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            lines.append(f"\n{name}: {(section.__doc__ or '').strip().splitlines()[0]}")
            for sub, subfield in section.model_fields.items():
                default = values[name][sub] if values else subfield.get_default(call_default_factory=True)
                describe(f"{name}.{sub}", subfield, default)
        elif name == "scenario":
            lines.insert(1, f"  scenario  (the positional argument) {field.description}")
        else:
            describe(name, field, values[name] if values else field.get_default(call_default_factory=True))
    return "\n".join(lines) + "\n"


class RunHelp(argparse.Action):
    """``run [<scenario>] --help``: the usage, then every config field with the named scenario's defaults."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=kwargs.get("help"))

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
        from finetune_flows.plugins import FinetuneFlowsError

        parser.print_help()
        try:
            sys.stdout.write("\n" + config_fields_help(getattr(namespace, "scenario", None)))
        except FinetuneFlowsError as exc:
            parser.exit(2, f"finetune-flows: error: {exc}\n")
        parser.exit()
