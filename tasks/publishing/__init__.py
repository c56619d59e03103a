"""Registering versions in MLflow and the promotion gate."""
