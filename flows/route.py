"""Flow ``route``: customer messages -> an intent and its reply, or a hand-off to a person, from the champion.

Deployments reach it by entrypoint ``flows/route.py:route``. Nothing on this path imports torch:
the registered pyfunc runs the ONNX graph on onnxruntime.
"""

from __future__ import annotations

from prefect import flow

from finetune_flows.tasks.routing.routing import RouteConfig, RouteResult, publish_routes, route_batch


@flow(name="route", log_prints=False)
def route(config: RouteConfig) -> RouteResult:
    """Route a file of customer messages with the registered intent model; write the routes, show the first."""
    result = route_batch(config)
    publish_routes(result)
    return result
