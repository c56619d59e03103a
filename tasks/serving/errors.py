"""The errors a served model raises: plain ``ValueError`` subclasses, so this package needs nothing else.

``tasks/serving`` is shipped inside every registered model and runs where finetune-flows is not
installed, so it cannot raise ``finetune_flows.plugins.errors``; callers inside finetune-flows that
need a ``ConfigError`` convert (see ``tasks.monitoring.taxonomy``).
"""

from __future__ import annotations


class ModelFilesError(ValueError):
    """A served model's files (ONNX graph, its metadata, tokenizer, taxonomy, topic folder) are missing or invalid."""


class ModelInputError(ValueError):
    """The input given to a served model lacks what the model needs (a column, for instance)."""
