"""Training progress in the Prefect UI: a Trainer callback that keeps a progress artifact at the share of steps done."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def prefect_progress_callback(key: str) -> Any:
    """A Trainer callback that keeps a Prefect progress artifact at the share of steps done."""
    from transformers import TrainerCallback

    class PrefectProgress(TrainerCallback):
        def __init__(self) -> None:
            self.artifact_id: Any = None
            self.last = -1.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.artifact_id = create_progress_artifact(progress=0.0, key=key, description="Fine-tuning progress")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            done = round(100.0 * state.global_step / max(state.max_steps, 1), 1)
            if self.artifact_id is not None and done - self.last >= 1.0:
                update_progress_artifact(self.artifact_id, progress=done)
                self.last = done

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.artifact_id is not None:
                update_progress_artifact(self.artifact_id, progress=100.0)

    return PrefectProgress()
