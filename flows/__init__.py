"""Prefect flows (the DAGs), their deployments, and the `mlxflow` command line."""
