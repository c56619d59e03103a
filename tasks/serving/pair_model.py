"""MLflow models-from-code entry for a registered bi-encoder (see ``tasks.serving.pair_scorer``)."""

from mlflow.models import set_model

from finetune_flows.tasks.serving.pair_scorer import PairScorerPyfunc

set_model(PairScorerPyfunc())
