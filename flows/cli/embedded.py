"""The temporary Prefect server a command's flow reports to when no Prefect server is configured.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself, as a child in the command's
process group, stopped at exit. Two things go wrong with it: a Ctrl-C reaches the server as well as
the flow, so the flow's final state (Crashed) has nowhere to go; and a ``kill -9`` of the command
leaves the server running for good. ``temporary_server`` starts Prefect's own server class
(``SubprocessASGIServer``, the same command line) in a session of its own, so a Ctrl-C reaches only
the command, and with a parent-death signal (Linux ``PR_SET_PDEATHSIG``): when the command dies, by
any signal, the kernel sends the server SIGTERM. The start is serialised by a lock in Prefect's
home, so two first runs on a new state folder do not both create Prefect's database.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the server process before it runs: SIGTERM when the command ends (and at once if it already has)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _server_class() -> Any:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class CommandServer(SubprocessASGIServer):
        """Prefect's temporary server, in its own session and ended with the command (see the module docstring)."""

        _instances: dict[int | None, Any] = {}  # Prefect keeps one server per port and class: not Prefect's own

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect

            parent = os.getpid()
            argv = [
                sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ]  # fmt: skip
            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(parent))

    return CommandServer


@contextmanager
def temporary_server(prefect_home: Path) -> Iterator[str | None]:
    """Run the body against a temporary Prefect server (its API URL), unless a Prefect server is configured
    (``PREFECT_API_URL``: yields None and starts nothing)."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield None
        return
    prefect_home.mkdir(parents=True, exist_ok=True)
    server = _server_class()()
    with (prefect_home / ".server-start.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first start creates Prefect's database: one at a time
        try:
            server.start()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                APILogWorker.drain_all(timeout=5)  # the run's last logs reach the server before it stops
    finally:
        server.stop()
