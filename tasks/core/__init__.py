"""Shared stages and models: settings, config, reading tables, ingest, tokenize, train, track."""
