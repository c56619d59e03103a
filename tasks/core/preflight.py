"""Checks before a run opens: the MLflow store answers and the folders the run writes to can be written.

``check_before_run`` runs at the top of the start-run stage, before the MLflow run or the run folder exists, so
a store that is down or a state folder that cannot be written fails in a second with a ``ConfigError`` naming
the (redacted) URI or the path and the setting to change, instead of a traceback after training. For the
default SQLite store it costs a few file-system calls (about a millisecond).

The MLflow store: an ``http(s)`` URI must answer ``GET <uri>/health`` (or, where a server has no such route,
``/api/2.0/mlflow/experiments/search``) within ``TIMEOUT_S`` seconds, without any proxy; ``sqlite`` and ``file``
stores need a writable folder. Other schemes (``databricks``, database URIs) are left to MLflow.
"""

from __future__ import annotations

import base64
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.core.secrets import redact
from finetune_flows.tasks.core.settings import Settings, get_settings
from finetune_flows.tasks.core.tracking import RunConfig

TIMEOUT_S = 5.0
"""Seconds an http(s) MLflow server has to answer the reachability check."""
STATE_SETTING = "FINETUNE_FLOWS_STATE_DIR"


def check_before_run(config: RunConfig, settings: Settings | None = None) -> None:
    """Fail with a ``ConfigError`` before the run opens when its MLflow store or output folders are unusable.

    Checks the store first (it creates nothing), then the run folder's parent, the cache and a ``file:``
    artifact root of ``config``'s experiment."""
    settings = settings or get_settings()
    uri_setting = "FINETUNE_FLOWS_MLFLOW_TRACKING_URI" if settings.mlflow_tracking_uri else STATE_SETTING
    check_store(settings.tracking_uri, uri_setting)
    writable_folder(settings.runs_dir, STATE_SETTING, "run folders")
    writable_folder(settings.cache_dir, STATE_SETTING, "the cache")
    artifacts = local_path(settings.artifact_root)
    if artifacts is not None:
        setting = "FINETUNE_FLOWS_MLFLOW_ARTIFACT_ROOT" if settings.mlflow_artifact_root else STATE_SETTING
        experiment = artifacts / config.experiment_name
        writable_folder(experiment if experiment.is_dir() else artifacts, setting, "MLflow artifacts")


def check_store(uri: str, setting: str) -> None:
    """The MLflow store at ``uri`` is reachable (http/https) or its folder writable (sqlite/file)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        reach_server(uri, setting)
    elif scheme == "sqlite" or scheme in ("file", ""):
        path = local_path(uri)
        if path is not None:
            database = scheme == "sqlite"
            writable_folder(path.parent if database else path, setting, "the MLflow store")
            if database and path.exists() and not os.access(path, os.W_OK):
                raise ConfigError(f"the MLflow store {path} is not writable: change {setting} or its permissions")


def reach_server(uri: str, setting: str) -> None:
    """``GET <uri>/health`` (``/api/2.0/mlflow/experiments/search`` where that is missing) answers in time."""
    parts = urlsplit(uri)
    base = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment="")).rstrip("/")
    headers = {}
    if parts.username is not None:  # a token-only URI (https://TOKEN@host/) is basic auth with an empty password
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for route in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with opener.open(urllib.request.Request(base + route, headers=headers), timeout=TIMEOUT_S):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and route == "/health":
                continue
            if exc.code < 500:  # it answered (a refused login is the registry's concern, with MLflow's message)
                return
            problem = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            problem = f"{type(reason).__name__}: {reason}"
        raise ConfigError(
            redact(
                f"the MLflow tracking server {uri} is not reachable ({problem} on GET {route.split('?')[0]} within "
                f"{TIMEOUT_S:g} s): start it (`finetune-flows up`) or correct {setting}; nothing was run"
            )
        )


def local_path(uri: str) -> Path | None:
    """The file-system path of a ``sqlite:///``, ``file:`` or plain-path URI; None for any other scheme."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        rest = uri.split("://", 1)[1].split("?", 1)[0]  # sqlite:///rel.db or sqlite:////abs.db
        return None if rest in ("", "/", "/:memory:") else Path(rest[1:] if rest.startswith("/") else rest)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    return Path(uri) if parts.scheme == "" else None


def writable_folder(path: Path, setting: str, purpose: str) -> None:
    """``path`` exists as a folder (created if missing) that a file can be written to, or a ``ConfigError``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write {purpose} to {path} ({type(exc).__name__}: {exc.strerror or exc}): change {setting} "
            "to a folder you can write, or fix its permissions; nothing was run"
        ) from exc
