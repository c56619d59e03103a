"""Every exception finetune-flows raises on purpose, in one place.

Each message is built from the facts (what, where, how to fix), so callers never need to
re-format it:

- ``FinetuneFlowsError``: the base class; catch it to handle any of ours.
- ``PluginError``: a head or scenario is unknown, duplicated, broken or of the wrong API version.
- ``ConfigError``: a parameter model or a ``--set key=value`` override is invalid.
- ``DataError``: an input file is unreadable or a row is invalid; names file, row, column, value.
- ``ParityError``: the exported ONNX graph disagrees with the PyTorch model; nothing is published.
- ``PromotionError``: the model registry refused a step; the champion alias was not moved.
"""

from __future__ import annotations

from pathlib import Path


class FinetuneFlowsError(Exception):
    """Base class of the errors finetune-flows raises on purpose."""


class PluginError(FinetuneFlowsError):
    """A plugin is unknown, duplicated, broken, or does not satisfy its protocol."""


class ConfigError(FinetuneFlowsError):
    """A configuration value is invalid."""


class DataError(FinetuneFlowsError):
    """An input file or one of its rows is invalid.

    ``row`` counts data rows from 1 (the header is not a row); ``line`` is the physical line in
    the file where the format has lines. Every given fact is part of the message.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        line: int | None = None,
        column: str | None = None,
        value: object = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.row = row
        self.line = line
        self.column = column
        self.value = value
        self.hint = hint
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if row is not None:
            where.append(f"row {row}")
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        if value is not None:
            where.append(f"value {_short(value)}")
        message = problem if not where else f"{problem} ({', '.join(where)})"
        if hint:
            message = f"{message}. {hint}"
        super().__init__(message)


class ParityError(FinetuneFlowsError):
    """The ONNX export does not reproduce the PyTorch model within tolerance."""


class PromotionError(FinetuneFlowsError):
    """Registering or promoting a model version failed; the aliases were left as they were."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
