"""Credentials in URIs never leave the process: ``http://user:pw@host/`` is written as ``http://***@host/``.

The MLflow tracking URI (``FINETUNE_FLOWS_MLFLOW_TRACKING_URI``) may carry a user and password
(``http://user:pw@host/``), a token (``https://TOKEN@host/``) or database credentials
(``postgresql://u:pw@db/x``), or a query parameter may (``https://host/?token=T``). The design:

- Only ``Settings.tracking_uri`` (the environment) holds the real URI. Nothing Prefect stores gets it:
  ``RunInfo`` (a parameter of every stage and of the ``train`` subflow / deployment) carries the
  redacted form, and each stage reads the real one from its own environment
  (``tracking.tracking_uri_for``), so a handed-off run gets it from its worker's environment.
- ``redact`` replaces the userinfo of every ``scheme://userinfo@`` in a text with ``***``, and the
  value of a secret-named query parameter (``token``, ``access_token``, ``api_key``, ``sig``, ...): MLflow
  params and tags, the registration artifact's link, a failed flow's state message and the CLI's
  error line all go through it.
- ``install_log_redaction`` makes every log record of the process redacted at creation (a record
  factory, so records reaching any handler are covered: the console, Prefect's API log handler
  that writes to its database, a worker's log file), tracebacks included. The CLI, the first
  stage of a run and every stage that opens the tracking store install it (it is idempotent).
- ``guard`` (every stage calls it, through ``tracking.tracking_uri_for``, before handing the URI to
  MLflow) moves the user and password of an ``http(s)://user:pw@host/`` URI into MLflow's own
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (of this process) and gives MLflow the
  URI without them: MLflow's error messages, warnings and run links then never hold the password.
  A token-only URI (``https://TOKEN@host/``, basic auth with an empty password, which MLflow's
  variables cannot express) and database URIs keep their credentials inside MLflow.
- ``mute_mlflow_links`` stops MLflow from printing "View run ... at: <uri>" on stdout when the URI
  carries credentials (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``); without credentials the link
  stays, and a local ``sqlite:///`` store (MLflow prints nothing for it) is untouched.

A password holding an unescaped ``/``, ``?``, ``#`` or whitespace is not a valid URI and may be
redacted only up to that character: percent-encode such passwords.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme "://" userinfo "@": userinfo runs up to the last "@" before the path, query or fragment
URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#]+)@")
REDACTED = "***"
# a query parameter that carries a secret: ?token=..., &access_token=..., ?api_key=..., ?password=..., ?sig=...
QUERY_SECRETS = r"(?:access_?token|token|api_?key|apikey|key|secret|password|passwd|pwd|sig|signature|auth|credential)"
QUERY_CREDENTIALS = re.compile(rf"(?P<key>(?<=[?&;]){QUERY_SECRETS})=[^\s&#;'\"]+", re.IGNORECASE)
MLFLOW_MUTE_VARIABLE = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced: ``http://u:pw@host/`` -> ``http://***@host/``,
    ``https://host/?token=T`` -> ``https://host/?token=***`` (``QUERY_SECRETS`` names the query keys)."""
    if "://" not in text:
        return text
    if "@" in text:
        text = URI_CREDENTIALS.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)
    if "=" in text:
        text = QUERY_CREDENTIALS.sub(lambda match: f"{match['key']}={REDACTED}", text)
    return text


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds a URI with a user, password or token in it."""
    return redact(text) != text


def redact_record(record: logging.LogRecord) -> None:
    """Redact one log record in place: its message (arguments merged in), traceback and stack."""
    if record.args or not isinstance(record.msg, str):
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it itself, leave it as it was
            return
    else:
        message = record.msg
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A ``logging.Filter`` that lets every record through, redacted (see ``redact_record``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install_log_redaction() -> None:
    """Redact every log record this process creates from now on (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "finetune_flows_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redact_record(record)
        return record

    factory.finetune_flows_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def mute_mlflow_links(tracking_uri: str) -> None:
    """Stop MLflow printing run links (which embed the URI) on stdout when ``tracking_uri`` has credentials."""
    if has_credentials(tracking_uri):
        os.environ[MLFLOW_MUTE_VARIABLE] = "true"


def guard(tracking_uri: str) -> str:
    """The URI to give MLflow for ``tracking_uri``: logs redacted, http(s) credentials moved to MLflow's variables."""
    install_log_redaction()
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https") and parts.username and parts.password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
        tracking_uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    mute_mlflow_links(tracking_uri)
    return tracking_uri
