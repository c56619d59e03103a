"""Prefect flows: each module sequences tasks from ``tasks/`` and nothing else."""
