"""The processes of the local services (``finetune-flows up``): process groups, ports and health endpoints.

Each service runs as its own process group (a new session), its output appended to its log; it is
alive while its leader runs and still leads the group, and stopping it signals the whole group
(SIGTERM, then SIGKILL). Process groups are read from /proc (Linux). Health is a plain GET without
any proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from finetune_flows.plugins import FinetuneFlowsError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class ServiceError(FinetuneFlowsError):
    """A service did not start, did not become healthy, or its port is taken."""


class Service(BaseModel):
    """One process group that ``up`` started (the group id is the leader's pid)."""

    name: str
    pid: int
    log: str
    url: str | None = None
    health_url: str | None = None


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our own child (it is when ``up`` ran in this process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, as /proc lists them (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # the process ended while we looked
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()  # after "pid (command)"
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs and still leads its own process group (so it is the one ``up`` started)."""
    _reap(pid)
    return pid in group_members(pid)


def http_status(url: str, authorization: str | None = None, timeout: float = 2.0) -> int | None:
    """The status of GET ``url`` (without any proxy, with ``authorization`` if given); None: no answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def is_healthy(url: str | None, timeout: float = 2.0) -> bool:
    """GET ``url`` (without any proxy) answers 200."""
    return url is not None and http_status(url, timeout=timeout) == 200


def check_port_free(port: int, setting: str) -> None:
    """Nothing listens on ``HOST:port``; else a ``ServiceError`` naming ``setting``, the variable that moves it."""
    with socket.socket() as sock:
        # As the servers bind (SO_REUSEADDR): connections of a just-stopped server in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            message = f"port {HOST}:{port} is in use ({exc.strerror}); stop what listens there or set {setting}"
            raise ServiceError(message) from exc


def spawn(name: str, argv: list[str], env: dict[str, str], folder: Path) -> int:
    """Start ``argv`` in a new session (its own process group), output to ``<folder>/<name>.log``."""
    log = folder / f"{name}.log"
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    logger.info("started %s (pid %d), log %s", name, pid, log)
    return pid


def wait_healthy(service: Service, deadline: float) -> None:
    """Return once the service's health endpoint answers 200; a ``ServiceError`` when its process exits first or
    ``deadline`` (``time.monotonic``) passes."""
    while not is_healthy(service.health_url):
        if not is_alive(service.pid):
            raise ServiceError(f"{service.name} exited before it became healthy; see its log {service.log}")
        if time.monotonic() > deadline:
            timeout = "FINETUNE_FLOWS_SERVICE_TIMEOUT"
            raise ServiceError(
                f"{service.name} did not answer {service.health_url} in time ({timeout}); see {service.log}"
            )
        time.sleep(0.5)


def stop_group(service: Service, grace: float) -> None:
    """SIGTERM the service's process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    _reap(service.pid)
    if not group_members(service.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(service.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(service.pid)
            if not group_members(service.pid):
                logger.info("stopped %s (pid %d)", service.name, service.pid)
                return
            time.sleep(0.2)
        logger.warning("%s (pid %d) still runs after %s", service.name, service.pid, sig.name)
    raise ServiceError(f"could not stop {service.name} (process group {service.pid}); see its log {service.log}")
