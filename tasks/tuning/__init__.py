"""Hyperparameter search for the ``tune`` flow: the search space, the Optuna study and one trial."""
