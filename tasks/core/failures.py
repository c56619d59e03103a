"""A failed pipeline run names the stage that failed: "stage evaluate failed: DataError: ...".

Flows end in ``stage_failed(exc, STAGES)``: a Prefect ``Failed`` state whose message names the
innermost stage on the traceback (or the one an inner flow or a scenario stage recorded on the
exception), carrying the exception itself so a caller of the flow function gets it raised. The
message (stored by Prefect, shown in its UI) has any URI credentials in it redacted.

``ending_run`` wraps a flow's stages once its MLflow run is open: an error leaves that run FAILED, an
interruption (SIGTERM, Ctrl-C) KILLED, naming the stage either way, and the run folder is released.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prefect import Flow, Task
from prefect.states import Failed

from finetune_flows.tasks.core.secrets import redact

if TYPE_CHECKING:
    from finetune_flows.tasks.core.tracking import RunInfo

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


@contextmanager
def ending_run(run: RunInfo, stages: Iterable[Task[..., Any] | Flow[..., Any]]) -> Iterator[None]:
    """The block's error ends ``run``'s MLflow run FAILED, an interruption KILLED (the stage named either way; the
    block's own exception is re-raised, with a note if marking failed); the run folder is released in any case."""
    from finetune_flows.tasks.core.tracking import end_run, release_run_folder

    try:
        yield
    except Exception as exc:
        _end(run, "FAILED", exc, stages, end_run)
        raise
    except BaseException as exc:  # SIGTERM (Prefect raises TerminationSignal) or Ctrl-C: interrupted, resumable
        _end(run, "KILLED", exc, stages, end_run)
        raise
    finally:
        release_run_folder(run)


def _end(run: RunInfo, status: str, exc: BaseException, stages: Iterable[Any], end_run: Any) -> None:
    try:
        end_run(run, status, failing_stage(exc, stages))
    except Exception as marking:  # the stage's own error is the one to report
        exc.add_note(f"the MLflow run {run.run_id} could not be marked {status}: {marking}")
