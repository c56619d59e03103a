"""MLflow models-from-code entry for a registered bi-encoder (see ``tasks.pair_serving``)."""

from mlflow.models import set_model

from tasks.pair_serving import PairScorerPyfunc

set_model(PairScorerPyfunc())
