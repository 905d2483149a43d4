"""The Prefect side of mlxcore/clients/secrets.py: `api_key_secret: <name>` is a Prefect Secret block.

Resolved by the task that makes the requests, when it makes its client: the key never becomes a
flow or task parameter, a result or a cache key. (mlxcore cannot import prefect, so the tasks
hand this function to it.)
"""

from __future__ import annotations


def prefect_secret(name: str) -> str:
    """The value of the Prefect Secret block `name` (on the Prefect server this process uses)."""
    from prefect.blocks.system import Secret

    value = Secret.load(name, _sync=True).get()
    if not isinstance(value, str):
        raise TypeError(f"Prefect Secret block {name!r} holds a {type(value).__name__}, not a string key")
    return value
