"""Notifications (``deployments/automations.yaml`` wired by ``flows/cli/notifications.py``) through a user's block.

Against a Prefect server: a Custom Webhook block pointing at a local receiver on 127.0.0.1, the
automations wired to it, then a real monitor run that raises a negative spike and a flow run that
fails: the receiver gets one message for each, with the figures in them. Wiring again replaces the
automations instead of adding copies; a block that does not exist is named in the error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from finetune_flows.flows.cli.notifications import AUTOMATIONS_YAML, wire_notifications
from finetune_flows.flows.cli.processes import ServiceError
from finetune_flows.tasks.monitoring.scoring import MonitorConfig
from tests.test_monitor import register_keyword_model, stream, write_csv


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A webhook receiver on 127.0.0.1: (its URL, the JSON bodies it got)."""
    received: list[dict[str, str]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def server_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value()).removesuffix("/api")


def wait_for(received: list[dict[str, str]], count: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.usefixtures("prefect_harness")
def test_spikes_and_failed_runs_reach_the_users_webhook_once_each(
    state_dir: Path, tmp_path: Path, receiver: tuple[str, list[dict[str, str]]]
) -> None:
    from prefect import flow
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    from finetune_flows.flows.monitor import monitor

    url, received = receiver
    hook = CustomWebhookNotificationBlock(name="ops", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"})
    hook.save("ops-test", overwrite=True)
    names = wire_notifications(server_url(), "custom-webhook/ops-test")
    assert names == wire_notifications(server_url(), "custom-webhook/ops-test")  # wired twice: replaced
    with get_client(sync_client=True) as client:
        assert sorted(a.name for a in client.read_automations() if a.name in names) == sorted(names)

    register_keyword_model()
    write_csv(tmp_path / "batch.csv", stream({"banks": (10, 6), "energy": (10, 2)}))
    assert len(monitor(MonitorConfig(source=str(tmp_path / "batch.csv"))).alerts) == 1
    wait_for(received, 1)

    @flow(name="doomed")
    def doomed() -> None:
        raise ValueError("boom")

    doomed(return_state=True)
    wait_for(received, 2)
    time.sleep(3)  # nothing else is due
    subjects = sorted(m["subject"] for m in received)
    assert len(received) == 2, received
    assert subjects[0].startswith("finetune-flows: flow run ") and subjects[0].endswith(" Failed")
    assert subjects[1] == "finetune-flows: negative spike in banks"
    spike = next(m["body"] for m in received if "negative spike" in m["subject"])
    assert "negative share 0.6 of\n10 texts" in spike and "models:/finance-monitoring@champion" in spike


@pytest.mark.usefixtures("prefect_harness")
def test_a_missing_block_is_named() -> None:
    with pytest.raises(ServiceError, match=r"notification block 'custom-webhook/nobody' .* not found"):
        wire_notifications(server_url(), "custom-webhook/nobody", path=AUTOMATIONS_YAML)
