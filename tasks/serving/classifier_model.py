"""MLflow models-from-code entry: the file MLflow runs to build the pyfunc of a registered classifier.

Logging, MLflow runs this file from ``tasks/serving`` in the installed finetune-flows. Loading a
registered version, it runs the copy in the model's folder, after putting the model's ``code/``
folder first on ``sys.path``: the pyfunc then comes from the copy of ``tasks/serving`` shipped
there as ``finetune_flows_serving`` (``packaging.served_code_paths``), without finetune-flows.
"""

import sys
from pathlib import Path

from mlflow.models import set_model

SHIPPED = "finetune_flows_serving"

if (Path(__file__).resolve().parent / "classifier.py").is_file():  # logging: run from tasks/serving itself
    from finetune_flows.tasks.serving.classifier import TextClassifierPyfunc
else:  # loading a registered version
    # A model loaded earlier in this process may have imported its own copy: forget it.
    for name in [m for m in sys.modules if m == SHIPPED or m.startswith(f"{SHIPPED}.")]:
        del sys.modules[name]
    from finetune_flows_serving.classifier import TextClassifierPyfunc

set_model(TextClassifierPyfunc())
