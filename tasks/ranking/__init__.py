"""The recommendation workload: interactions, split, baselines, ranking evaluation, recommend."""
