"""Prefect tasks: each wraps one mlxcore call with a content-based cache key and artifacts.

Importing the package keeps Prefect's failure logs to one line for mlxcore's input errors
(tasks/logs.py)."""

from tasks.logs import quiet_input_errors

quiet_input_errors()
