"""Routing customer messages with registered models: an intent and its reply, or a hand-off to a person.

``route_messages`` loads ``models:/<name>@<alias>`` (resolved to its version, as the alias may move)
as the served pyfunc (the ONNX graph on onnxruntime; torch is never imported) and reads the two
files every ``customer-service`` version ships with it: the reply templates (``answers.csv``,
``tasks/classification/answers.py``) and the hand-off policy (``handoff.json``,
``tasks/classification/handoff.py``). A message the model is sure enough about gets its intent's
reply and help-page link; one below the policy's confidence threshold is handed to a person with
``HANDOFF_REPLY``. A version without a hand-off policy answers every message with its intent.

Where a multi-label intent model (``intents-multilabel``) and a slot model (``slots``) are registered
with the same alias, every message also gets their output: ``intents`` (``;``-separated, e.g.
``cancel;transfer_payment;not_working``) and ``slots`` (a JSON list of slot, text, start, end).
Without them those columns stay empty; a model named by the user but not registered is an error.

``route_file`` reads a table of messages (``read_table``: CSV, TSV, JSONL or Parquet, every problem
a ``DataError`` naming file, row, column and value), routes them and writes the routes as a
formula-safe CSV or as Parquet; ``route_batch`` is its Prefect task, ``publish_routes`` shows the
result in the Prefect UI.
"""

from __future__ import annotations

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
from finetune_flows.tasks.core.secrets import guard, redact
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import records
from finetune_flows.tasks.routing.messages import read_messages, write_routes
from finetune_flows.tasks.routing.registered import ServedModel, find_version, resolve_version
from finetune_flows.tasks.serving.classifier import HANDOFF_ARTIFACT
from finetune_flows.tasks.serving.slots import SLOTS_COLUMN

logger = logging.getLogger(__name__)

HANDOFF_REPLY = "Let me connect you with a colleague."
"""The reply of every message handed to a person."""
INTENT, HANDOFF = "intent", "handoff"
"""The two values of the ``route`` column."""
COLUMNS = ["text", "route", "intent", "confidence", "reply", "link", "intents", "slots", "model_version"]
"""``intents`` and ``slots`` are empty where no multi-label intent or slot model routed."""
OUTPUT_SUFFIXES = (".csv", ".parquet")
PREVIEW_ROWS = 50
"""Rows carried in ``RouteResult.first`` and shown in the table artifact."""
TOP_INTENTS = 10
OPTIONAL_MODELS = (("intents", "intents_model", "intents-multilabel"), ("slots", "slots_model", "slots"))
"""(output column, RouteConfig field, the scenario that registers such a model)."""


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
    intents_model: str | None = Field(
        default="intents-multilabel",
        max_length=200,
        description="Registered multi-label intent model (same alias) whose intents each message also gets, where it "
        "is registered. Empty: none.",
    )
    slots_model: str | None = Field(
        default="slots",
        max_length=200,
        description="Registered slot model (same alias) whose slots each message also gets, where it is registered. "
        "Empty: none.",
    )
    output_path: str | None = Field(
        default=None,
        max_length=1000,
        description="CSV or Parquet file (by suffix) for the routes. Empty: <state>/routes/<name>-v<n>-<time>.csv",
    )

    @field_validator("intents_model", "slots_model")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

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
    intents: str = ""
    slots: str = ""


class RouteResult(BaseModel):
    """Where the routes are, how many messages were handed off, and which model routed them."""

    model_config = ConfigDict(frozen=True)

    output_path: str
    rows: int
    handoffs: int
    intents: dict[str, int] = Field(description=f"Messages answered per intent, the {TOP_INTENTS} most frequent.")
    model_uri: str
    model_version: str
    also_routed_by: list[str] = Field(default=[], description="The multi-label intent and slot models that routed.")
    first: list[RoutedMessage] = Field(description=f"The first {PREVIEW_ROWS} routes, as written.")
    seconds: float


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
            "intents": "",
            "slots": "",
            "model_version": model_version,
        },
        columns=COLUMNS,
    )


def optional_models(config: RouteConfig) -> dict[str, str]:
    """The optional models that route too, by output column (``intents``, ``slots``) -> version: a default name that
    is not registered (with the alias) is left out; a name the user set must be there (``resolve_version``)."""
    found: dict[str, str] = {}
    for column, field, scenario in OPTIONAL_MODELS:
        name = getattr(config, field)
        if name is None:
            continue
        if field in config.model_fields_set:
            found[column] = resolve_version(name, config.alias, field, scenario)
        elif (version := find_version(name, config.alias)) is not None:
            found[column] = version
        else:
            logger.info("route: no %s@%s registered, so no %s column", name, config.alias, column)
    return found


def extra_columns(served: ServedModel, column: str, texts: list[str]) -> list[str]:
    """The ``intents`` (``;``-joined labels) or ``slots`` (JSON list) of ``texts`` from a multi-label or slot model."""
    predicted = served.predict(texts)
    source = "labels" if column == "intents" else SLOTS_COLUMN
    if source not in predicted.columns:
        raise ConfigError(
            f"{served.uri} is not a {'multi-label intent' if column == 'intents' else 'slot'} model: its output has "
            f"columns {list(predicted.columns)[:10]}, not {source!r}"
        )
    return predicted[source].astype(str).tolist()


def route_messages(texts: Sequence[str], config: RouteConfig) -> tuple[pd.DataFrame, list[str]]:
    """Route ``texts`` with ``models:/<config.model_name>@<config.alias>`` and the optional models: one row per text
    with ``COLUMNS``, and the URIs of the optional models that routed."""
    import mlflow

    mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
    version = resolve_version(config.model_name, config.alias)
    extras = optional_models(config)
    names = {column: getattr(config, field) for column, field, _ in OPTIONAL_MODELS}
    with tempfile.TemporaryDirectory(prefix="route-") as scratch:
        served = ServedModel(config.model_name, version, Path(scratch))
        if ANSWERS_ARTIFACT not in served.shipped:
            raise ConfigError(
                f"{served.uri} ships no reply templates (artifacts: {sorted(served.shipped)}); route needs an intent "
                "model registered with answers.csv, e.g. by `finetune-flows run customer-service`"
            )
        answers = read_answers(served.shipped[ANSWERS_ARTIFACT])
        policy = served.shipped_json(HANDOFF_ARTIFACT)
        handoff_label = str(policy.get("label", HANDOFF)) if policy is not None else None
        routes = routes_of(texts, served.predict(list(texts)), answers, handoff_label, version)
        uris = []
        for column, extra_version in extras.items():
            extra = ServedModel(str(names[column]), extra_version, Path(scratch))
            routes[column] = extra_columns(extra, column, list(texts))
            uris.append(extra.uri)
    return routes, uris


def default_output(model_name: str, version: str, when: datetime) -> Path:
    """<state>/routes/<name>-v<version>-<UTC time>.csv"""
    return get_settings().state / "routes" / f"{model_name}-v{version}-{when:%Y%m%dT%H%M%SZ}.csv"


def route_file(config: RouteConfig) -> RouteResult:
    """Read the configured messages, route them and write the routes; returns where they are and a summary."""
    started = datetime.now(UTC)
    texts = read_messages(Path(config.source).expanduser(), config.text_column)
    routes, also_routed_by = route_messages(texts, config)
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
        also_routed_by=also_routed_by,
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
