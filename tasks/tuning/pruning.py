"""``PruneOnEval``: the Trainer callback that reports each evaluation to the Optuna trial and stops a trial the
pruner gives up on. Imported only where a trial trains (it imports transformers)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    import optuna
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


class PruneOnEval(TrainerCallback):
    """Report ``eval_<metric>`` of every evaluation as the trial's intermediate value (step = the evaluation's
    number, from 1) and stop training when the pruner says so; ``pruned`` tells the trial afterwards."""

    def __init__(self, trial: optuna.trial.Trial, metric: str) -> None:
        self.trial = trial
        self.key = f"eval_{metric}"
        self.evaluations = 0
        self.pruned = False

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not metrics or self.key not in metrics:
            return
        self.evaluations += 1
        self.trial.report(float(metrics[self.key]), self.evaluations)
        if self.trial.should_prune():
            logger.info(
                "trial %d pruned at evaluation %d (step %d): %s %.4f",
                self.trial.number, self.evaluations, state.global_step, self.key, metrics[self.key],
            )  # fmt: skip
            self.pruned = True
            control.should_training_stop = True
