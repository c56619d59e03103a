"""Routing customer messages with a registered intent model: an intent and its reply, or a hand-off to a person.

``route_messages`` loads ``models:/<name>@<alias>`` (resolved to its version, as the alias may move)
as the served pyfunc (the ONNX graph on onnxruntime; torch is never imported) and reads the two
files every ``customer-service`` version ships with it: the reply templates (``answers.csv``,
``tasks/classification/answers.py``) and the hand-off policy (``handoff.json``,
``tasks/classification/handoff.py``). A message the model is sure enough about gets its intent's
reply and help-page link; one below the policy's confidence threshold is handed to a person with
``HANDOFF_REPLY``. A version without a hand-off policy answers every message with its intent.

``route_file`` reads a table of messages (``read_table``: CSV, TSV, JSONL or Parquet, every problem
a ``DataError`` naming file, row, column and value), routes them and writes the routes as a
formula-safe CSV or as Parquet; ``route_batch`` is its Prefect task, ``publish_routes`` shows the
result in the Prefect UI.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune_flows.plugins.errors import ConfigError, DataError
from finetune_flows.tasks.classification.answers import ANSWERS_ARTIFACT, Answer, read_answers
from finetune_flows.tasks.core.data_checks import CONTROL_CHARACTERS
from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.secrets import guard, redact
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import read_table, records
from finetune_flows.tasks.serving.classifier import HANDOFF_ARTIFACT

logger = logging.getLogger(__name__)

HANDOFF_REPLY = "Let me connect you with a colleague."
"""The reply of every message handed to a person."""
INTENT, HANDOFF = "intent", "handoff"
"""The two values of the ``route`` column."""
COLUMNS = ["text", "route", "intent", "confidence", "reply", "link", "model_version"]
OUTPUT_SUFFIXES = (".csv", ".parquet")
PREVIEW_ROWS = 50
"""Rows carried in ``RouteResult.first`` and shown in the table artifact."""
TOP_INTENTS = 10


class RouteConfig(BaseModel):
    """Which messages to route, with which registered intent model, and where the routes go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        min_length=1,
        max_length=1000,
        description="A CSV, TSV, JSONL or Parquet file (optionally .gz) with one customer message per row.",
    )
    text_column: str = Field(default="text", min_length=1, max_length=200, description="The column of the messages.")
    model_name: str = Field(
        default="customer-service", min_length=1, max_length=200, description="Registered intent model."
    )
    alias: str = Field(
        default="champion", pattern=r"^[\w-]{1,100}$", description="Alias of the model version that routes."
    )
    output_path: str | None = Field(
        default=None,
        max_length=1000,
        description="CSV or Parquet file (by suffix) for the routes. Empty: <state>/routes/<name>-v<n>-<time>.csv",
    )

    @field_validator("output_path")
    @classmethod
    def _known_suffix(cls, value: str | None) -> str | None:
        if value and Path(value).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"output_path must end in {' or '.join(OUTPUT_SUFFIXES)}, got {value!r}")
        return value


class RoutedMessage(BaseModel):
    """One routed message: ``route`` is ``intent`` (answered with ``reply``) or ``handoff`` (to a person);
    ``intent`` is the most likely intent either way and ``confidence`` its calibrated probability."""

    model_config = ConfigDict(frozen=True)

    text: str
    route: str
    intent: str
    confidence: float
    reply: str
    link: str


class RouteResult(BaseModel):
    """Where the routes are, how many messages were handed off, and which model routed them."""

    model_config = ConfigDict(frozen=True)

    output_path: str
    rows: int
    handoffs: int
    intents: dict[str, int] = Field(description=f"Messages answered per intent, the {TOP_INTENTS} most frequent.")
    model_uri: str
    model_version: str
    first: list[RoutedMessage] = Field(description=f"The first {PREVIEW_ROWS} routes, as written.")
    seconds: float


def read_messages(path: Path, text_column: str = "text") -> list[str]:
    """The messages in ``path``'s ``text_column``: a missing column, no rows, an empty message or a control
    character is a ``DataError`` naming file, row, column and value."""
    frame = read_table(path)
    if text_column not in frame.columns:
        raise DataError(
            f"missing column {text_column!r}; columns found: {list(frame.columns)}",
            file=path,
            column=text_column,
            hint="Name the messages' column with text_column=<name>",
        )
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    texts = frame[text_column].astype(str).tolist()
    for row, text in enumerate(texts, start=1):
        if not text.strip():
            raise DataError("empty message", file=path, row=row, column=text_column, value=text)
        found = CONTROL_CHARACTERS.search(text)
        if found:
            raise DataError(
                f"control character {found.group()!r} at position {found.start()}",
                file=path, row=row, column=text_column, value=text,
                hint="Remove NUL and other control characters (tab, newline and carriage return are allowed)",
            )  # fmt: skip
    return texts


def routes_of(
    texts: Sequence[str],
    predicted: pd.DataFrame,
    answers: dict[str, Answer],
    handoff_label: str | None,
    model_version: str,
) -> pd.DataFrame:
    """The routes (``COLUMNS``) of ``texts`` from the served model's output: ``label`` (an intent, or
    ``handoff_label`` below the hand-off threshold), ``intent`` (the most likely one; absent without a policy)
    and ``score``. An answered intent without a reply template is a ``DataError``."""
    if len(predicted) != len(texts) or not {"label", "score"} <= set(predicted.columns):
        raise DataError(
            f"model output has {len(predicted)} rows and columns {list(predicted.columns)}",
            hint=f"Expected {len(texts)} rows with columns label, score (and intent for a model with a hand-off)",
        )
    labels = predicted["label"].astype(str)
    intents = predicted["intent"].astype(str) if "intent" in predicted.columns else labels
    handed = (labels == handoff_label) if handoff_label else pd.Series(False, index=labels.index)
    missing = sorted(set(labels[~handed]) - set(answers))
    if missing:
        raise DataError(
            f"no reply template for intent(s) {missing} in the model's answers.csv",
            hint="Register a version whose answers.csv has a row (intent,reply,link) for every intent it predicts",
        )
    reply = [HANDOFF_REPLY if h else answers[i].reply for h, i in zip(handed, labels, strict=True)]
    link = ["" if h else answers[i].link for h, i in zip(handed, labels, strict=True)]
    return pd.DataFrame(
        {
            "text": list(texts),
            "route": [HANDOFF if h else INTENT for h in handed],
            "intent": intents.to_numpy(),
            "confidence": predicted["score"].astype(float).to_numpy(),
            "reply": reply,
            "link": link,
            "model_version": model_version,
        },
        columns=COLUMNS,
    )


def resolve_version(model_name: str, alias: str) -> str:
    """The version ``model_name@alias`` points to now; an unknown model is a ``ConfigError`` listing the registered
    ones, an unknown alias one listing the model's aliases. Uses the tracking URI already set."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        where = redact(mlflow.get_tracking_uri())
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        if model_name not in names:
            raise ConfigError(
                f"no registered model {model_name!r} in {where}; registered models: {names or 'none'}. Set "
                "model_name=<one of them>, or register one with `finetune-flows run customer-service`"
            ) from exc
        aliases = sorted(client.get_registered_model(model_name).aliases)
        raise ConfigError(
            f"no version of registered model {model_name!r} has alias {alias!r} in {where}; its aliases: {aliases}"
        ) from exc


def route_messages(texts: Sequence[str], model_name: str = "customer-service", alias: str = "champion") -> pd.DataFrame:
    """Route ``texts`` with ``models:/<model_name>@<alias>``: one row per text with ``COLUMNS``."""
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
    version = resolve_version(model_name, alias)
    uri = f"models:/{model_name}/{version}"
    with tempfile.TemporaryDirectory(prefix="route-") as scratch:
        folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=scratch))
        shipped = Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts", {})
        if ANSWERS_ARTIFACT not in shipped:
            raise ConfigError(
                f"{uri} ships no reply templates (artifacts: {sorted(shipped)}); route needs an intent model "
                "registered with answers.csv, e.g. by `finetune-flows run customer-service`"
            )
        answers = read_answers(folder / shipped[ANSWERS_ARTIFACT]["path"])
        handoff_label = None
        if HANDOFF_ARTIFACT in shipped:
            policy = json.loads((folder / shipped[HANDOFF_ARTIFACT]["path"]).read_text(encoding="utf-8"))
            handoff_label = str(policy.get("label", HANDOFF))
        model = mlflow.pyfunc.load_model(str(folder))
        predicted = model.predict(pd.DataFrame({"text": list(texts)}))
    return routes_of(texts, predicted, answers, handoff_label, version)


def default_output(model_name: str, version: str, when: datetime) -> Path:
    """<state>/routes/<name>-v<version>-<UTC time>.csv"""
    return get_settings().state / "routes" / f"{model_name}-v{version}-{when:%Y%m%dT%H%M%SZ}.csv"


def write_routes(routes: pd.DataFrame, path: Path) -> Path:
    """Parquet for a .parquet path (the data as it is), a formula-safe report CSV otherwise; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        routes.to_parquet(path, index=False)
        return path
    return write_csv(routes, path)


def route_file(config: RouteConfig) -> RouteResult:
    """Read the configured messages, route them and write the routes; returns where they are and a summary."""
    started = datetime.now(UTC)
    texts = read_messages(Path(config.source).expanduser(), config.text_column)
    routes = route_messages(texts, config.model_name, config.alias)
    version = str(routes["model_version"].iloc[0])
    out = Path(config.output_path) if config.output_path else default_output(config.model_name, version, started)
    write_routes(routes, out)
    answered = routes.loc[routes["route"] == INTENT, "intent"].value_counts()
    seconds = (datetime.now(UTC) - started).total_seconds()
    handoffs = int((routes["route"] == HANDOFF).sum())
    first = records(routes.head(PREVIEW_ROWS).drop(columns="model_version"))
    logger.info("route: %d messages, %d handed off, in %.1f s -> %s", len(routes), handoffs, seconds, out)
    return RouteResult(
        output_path=str(out),
        rows=len(routes),
        handoffs=handoffs,
        intents={str(k): int(v) for k, v in answered.head(TOP_INTENTS).items()},
        model_uri=f"models:/{config.model_name}/{version}",
        model_version=version,
        first=[RoutedMessage.model_validate(r) for r in first],
        seconds=seconds,
    )


@task(name="route-batch")
def route_batch(config: RouteConfig) -> RouteResult:
    """Route the configured file of messages with the registered intent model and write the routes."""
    return route_file(config)


def summary_markdown(result: RouteResult) -> str:
    """The run in a few lines: messages, hand-offs, the most frequent intents, where the routes are."""
    share = result.handoffs / result.rows if result.rows else 0.0
    lines = [
        f"## Routed {result.rows} messages with {result.model_uri}",
        "",
        f"- answered with an intent's reply: {result.rows - result.handoffs}",
        f"- handed off to a person: {result.handoffs} ({share:.0%})",
        f"- routes: `{result.output_path}`",
        "",
        "| intent | messages answered |",
        "|---|---|",
        *(f"| {intent} | {count} |" for intent, count in result.intents.items()),
    ]
    return "\n".join(lines) + "\n"


@task(name="publish-routes")
def publish_routes(result: RouteResult) -> None:
    """The first routes as a table artifact and the run's summary as a markdown artifact."""
    table = [
        {**r.model_dump(), "text": redact(r.text), "confidence": round(r.confidence, 4)} for r in result.first
    ]  # a message may quote a URL with credentials: never in the UI
    create_table_artifact(
        key="routes", table=table, description=f"First {len(table)} of {result.rows} routes from {result.model_uri}"
    )
    create_markdown_artifact(key="routes-summary", markdown=summary_markdown(result), description="Routing summary")
