"""A failed pipeline run names the stage that failed: "stage evaluate failed: DataError: ...".

Flows end in ``stage_failed(exc, STAGES)``: a Prefect ``Failed`` state whose message names the
innermost stage on the traceback (or the one an inner flow or a scenario stage recorded on the
exception), carrying the exception itself so a caller of the flow function gets it raised. The
message (stored by Prefect, shown in its UI) has any URI credentials in it redacted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect import Flow, Task
from prefect.states import Failed

from finetune_flows.tasks.core.secrets import redact

STAGE_ATTRIBUTE = "finetune_flows_stage"


def failing_stage(exc: BaseException, stages: Iterable[Task[..., Any] | Flow[..., Any]]) -> str | None:
    """The innermost of ``stages`` (tasks or flows) whose code is on ``exc``'s traceback."""
    named = getattr(exc, STAGE_ATTRIBUTE, None)
    if named:
        return str(named)
    codes = {stage.fn.__code__: stage.name for stage in stages}
    found, tb = None, exc.__traceback__
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found


def stage_failed(exc: Exception, stages: Iterable[Task[..., Any] | Flow[..., Any]]) -> Any:
    """A Failed state whose message names the stage and the cause (credentials redacted), carrying ``exc`` itself.

    A flow that returns it ends in that state (the message shows in the UI), and a caller of the
    flow function gets ``exc`` raised, type and message unchanged.
    """
    stage = failing_stage(exc, stages)
    if stage:
        setattr(exc, STAGE_ATTRIBUTE, stage)  # an enclosing flow reports the same stage
    where = f"stage {stage} failed" if stage else "failed"
    return Failed(message=redact(f"{where}: {type(exc).__name__}: {exc}"), data=exc)
