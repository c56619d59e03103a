"""An example third-party plugin package for finetune-flows.

It registers, through its own entry points (see ``pyproject.toml``), the head
``mean-pooled-classifier`` (``ffx_example.head``) and the scenario ``product-reviews``
(``ffx_example.scenario``). Nothing here imports torch at import time: ``finetune-flows plugins``
imports the head and scenario classes just to list them.
"""
