"""The monitoring workload: batches, the record store, scoring, trends, topics."""
