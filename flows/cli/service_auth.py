"""Basic authentication for the services ``finetune-flows up --auth`` starts.

The credentials are the clients' own variables, read from the environment and never defaulted:

- ``PREFECT_API_AUTH_STRING`` (``user:password``): what every Prefect client sends (workers,
  ``prefect deploy``, ``finetune-flows run`` handing a stage to a deployment, the ``prefect`` CLI).
  The Prefect server gets the same value as ``PREFECT_SERVER_API_AUTH_STRING``.
- ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: what every MLflow client sends. The
  MLflow server (``mlflow server --app-name basic-auth``) creates its admin user from them
  (``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` in its environment) the first
  time it starts on an empty user store, ``<state>/mlflow-auth.db``; a later start keeps the stored
  user (MLflow ignores a changed password there, and ``up`` then fails naming the store).

So one shell with these variables set runs ``up --auth`` and any client of the services. Secrets
travel in process environments only: never in argv, a URI or a file. The auth config
``<state>/services/mlflow-auth.ini`` (mode 0600) holds the user store and the default permission,
no credential. ``default_permission`` is READ: unauthenticated requests are
refused whatever it says; an account an admin adds for a teammate can then browse every
experiment and model, while writing runs, registering versions and moving aliases needs the admin
account the services use or a grant (NO_PERMISSIONS would show a new teammate an empty UI).
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from finetune_flows.plugins.errors import ConfigError

PREFECT_AUTH_VARIABLE = "PREFECT_API_AUTH_STRING"
MLFLOW_USERNAME_VARIABLE = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_MIN_PASSWORD = 12  # MLflow's own rule (mlflow.utils.validation._validate_password)
MLFLOW_DEFAULT_PERMISSION = "READ"


class ServiceAuth(BaseModel):
    """The credentials of the services; the secrets print as ``**********``."""

    model_config = ConfigDict(frozen=True)

    prefect_auth_string: SecretStr
    mlflow_username: str
    mlflow_password: SecretStr

    def client_env(self) -> dict[str, str]:
        """What each client of the services (workers, ``prefect deploy``) needs in its environment."""
        return {
            PREFECT_AUTH_VARIABLE: self.prefect_auth_string.get_secret_value(),
            MLFLOW_USERNAME_VARIABLE: self.mlflow_username,
            MLFLOW_PASSWORD_VARIABLE: self.mlflow_password.get_secret_value(),
        }

    def prefect_server_env(self) -> dict[str, str]:
        return {"PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth_string.get_secret_value()}

    def mlflow_server_env(self, config: Path) -> dict[str, str]:
        """The MLflow server's extras: its auth config, the admin user to create, a CSRF key."""
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.mlflow_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password.get_secret_value(),
            # The basic-auth app refuses to start without a static key (its sign-up form's CSRF
            # token); one random key per start is enough for one server process.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
        }

    def mlflow_authorization(self) -> str:
        """The ``Authorization`` header value of the MLflow admin user."""
        return basic_authorization(f"{self.mlflow_username}:{self.mlflow_password.get_secret_value()}")


def basic_authorization(user_password: str) -> str:
    """``Basic <base64(user:password)>``, as Prefect's and MLflow's clients send it."""
    return "Basic " + base64.b64encode(user_password.encode("utf-8")).decode("ascii")


def auth_from_environment(environ: Mapping[str, str] | None = None) -> ServiceAuth:
    """The credentials from ``environ`` (default: this process's); a ConfigError names what is missing or bad."""
    environ = os.environ if environ is None else environ
    variables = (PREFECT_AUTH_VARIABLE, MLFLOW_USERNAME_VARIABLE, MLFLOW_PASSWORD_VARIABLE)
    missing = [name for name in variables if not environ.get(name)]
    if missing:
        raise ConfigError(
            f"services with authentication (up --auth, FINETUNE_FLOWS_SERVICES_AUTH) take their credentials "
            f"from the environment; set {', '.join(missing)} ({PREFECT_AUTH_VARIABLE} as user:password). "
            "Nothing was started."
        )
    user, _, password = environ[PREFECT_AUTH_VARIABLE].partition(":")
    if not user or not password:
        raise ConfigError(f"{PREFECT_AUTH_VARIABLE} must be user:password (a non-empty user and password)")
    if len(environ[MLFLOW_PASSWORD_VARIABLE]) < MLFLOW_MIN_PASSWORD:
        length = len(environ[MLFLOW_PASSWORD_VARIABLE])
        raise ConfigError(
            f"{MLFLOW_PASSWORD_VARIABLE} has {length} characters; MLflow's basic auth needs at least "
            f"{MLFLOW_MIN_PASSWORD}"
        )
    return ServiceAuth(
        prefect_auth_string=SecretStr(environ[PREFECT_AUTH_VARIABLE]),
        mlflow_username=environ[MLFLOW_USERNAME_VARIABLE],
        mlflow_password=SecretStr(environ[MLFLOW_PASSWORD_VARIABLE]),
    )


def write_mlflow_auth_config(path: Path, database: Path) -> Path:
    """Write the basic-auth app's config (mode 0600) to ``path``; returns ``path``.

    It holds no credential: the admin user comes from the server's environment
    (``MLFLOW_AUTH_ADMIN_USERNAME`` / ``_PASSWORD`` take precedence over the file in MLflow's
    ``read_auth_config``), so nothing a user typed is parsed as ini.
    """
    database_uri = f"sqlite:///{database}".replace("%", "%%")  # configparser interpolates %
    text = (
        "[mlflow]\n"
        f"default_permission = {MLFLOW_DEFAULT_PERMISSION}\n"
        f"database_uri = {database_uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # created afresh, so the mode below holds from the first byte
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(text)
    return path
