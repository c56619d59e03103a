"""The registered models ``route`` reads: which version an alias names, and the served model with its shipped files.

An alias may move while a batch routes, so each model is resolved to its version once and every message
is routed by that version. ``find_version`` is for the optional models (multi-label intents, slots): a
model or alias that is not there yet is ``None``, not an error. ``ServedModel`` downloads a version's
pyfunc and the files it ships (reply templates, hand-off policy) into a scratch folder; its ``predict``
runs the ONNX graph on onnxruntime (torch is never imported).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.core.secrets import redact


def find_version(model_name: str, alias: str) -> str | None:
    """The version ``model_name@alias`` points to now; ``None`` when the model or the alias does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def resolve_version(model_name: str, alias: str, field: str = "model_name", scenario: str = "customer-service") -> str:
    """The version ``model_name@alias`` points to now; an unknown model is a ``ConfigError`` listing the registered
    ones (and how to set ``field`` or register one with ``scenario``), an unknown alias one listing the model's
    aliases. Uses the tracking URI already set."""
    import mlflow

    version = find_version(model_name, alias)
    if version is not None:
        return version
    client = mlflow.MlflowClient()
    where = redact(mlflow.get_tracking_uri())
    names = sorted(m.name for m in client.search_registered_models(max_results=1000))
    if model_name not in names:
        raise ConfigError(
            f"no registered model {model_name!r} in {where}; registered models: {names or 'none'}. Set "
            f"{field}=<one of them>, or register one with `finetune-flows run {scenario}`"
        )
    aliases = sorted(client.get_registered_model(model_name).aliases)
    raise ConfigError(
        f"no version of registered model {model_name!r} has alias {alias!r} in {where}; its aliases: {aliases}"
    )


class ServedModel:
    """Version ``version`` of ``model_name`` as its pyfunc, downloaded into ``scratch``; ``shipped`` maps each file the
    version ships (pyfunc artifact key) to its local path."""

    def __init__(self, model_name: str, version: str, scratch: Path) -> None:
        import mlflow
        from mlflow.models import Model

        self.uri = f"models:/{model_name}/{version}"
        self.version = version
        folder = Path(mlflow.artifacts.download_artifacts(self.uri, dst_path=str(scratch / model_name)))
        artifacts = Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts", {})
        self.shipped = {key: folder / entry["path"] for key, entry in artifacts.items()}
        self._pyfunc = mlflow.pyfunc.load_model(str(folder))

    def predict(self, texts: list[str]) -> pd.DataFrame:
        """The served model's output for ``texts``, one row each; a wrong row count is a ``ConfigError``."""
        predicted = self._pyfunc.predict(pd.DataFrame({"text": texts}))
        if len(predicted) != len(texts):
            raise ConfigError(f"{self.uri} answered {len(predicted)} rows for {len(texts)} messages")
        return predicted

    def shipped_json(self, key: str) -> dict[str, Any] | None:
        """The JSON file the version ships under ``key``; ``None`` when it ships none."""
        path = self.shipped.get(key)
        return json.loads(path.read_text(encoding="utf-8")) if path else None
