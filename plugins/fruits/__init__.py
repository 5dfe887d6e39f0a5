"""Helpers for the Fruits! embedding DAG: configuration, S3 layout, ledger, compute and validation."""
