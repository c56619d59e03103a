"""MLflow models-from-code entry: the file MLflow runs to build the pyfunc of a registered version."""

from mlflow.models import set_model

from finetune_flows.tasks.serving.classifier import TextClassifierPyfunc

set_model(TextClassifierPyfunc())
