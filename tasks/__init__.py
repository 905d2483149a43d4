"""Prefect tasks: each wraps one mlxcore call with a content-based cache key and artifacts."""
