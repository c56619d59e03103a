"""MLflow models-from-code entry for a registered adapted encoder (flow ``pretrain``); works as
``classifier_model`` does: logging, the installed finetune-flows is used; loading, the copy of
``tasks/serving`` shipped in the model's ``code/`` folder as ``finetune_flows_serving``.
"""

import sys
from pathlib import Path

from mlflow.models import set_model

SHIPPED = "finetune_flows_serving"

if (Path(__file__).resolve().parent / "embedding.py").is_file():  # logging: run from tasks/serving itself
    from finetune_flows.tasks.serving.embedding import SentenceEmbeddingPyfunc
else:  # loading a registered version
    for name in [m for m in sys.modules if m == SHIPPED or m.startswith(f"{SHIPPED}.")]:
        del sys.modules[name]
    from finetune_flows_serving.embedding import SentenceEmbeddingPyfunc

set_model(SentenceEmbeddingPyfunc())
