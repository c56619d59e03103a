"""The ``finetune-flows`` command line and the service supervisor behind ``up``/``down``."""
