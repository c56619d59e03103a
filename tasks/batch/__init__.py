"""Batch scoring on one process or a Dask cluster: input partitions, the cluster choice, resumable part files."""
