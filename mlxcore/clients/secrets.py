"""API keys for teachers and bench endpoints: named in configs, never written in them.

A config is a Prefect flow-run parameter, stored in Prefect's database and shown in its UI, so
it may only *name* where a key lives:

  api_key_env: OPENAI_API_KEY     an environment variable, read when the client is made, in the
                                  process that sends the requests
  api_key_secret: my-openai-key   a Prefect Secret block, resolved when the client is made

mlxcore does not import prefect: the caller hands in a `SecretResolver` (name -> value); the
Prefect tasks pass `tasks.secrets.prefect_secret`. A literal key (`api_key: sk-...`) is refused
by the config models (`refuse_literal_key`) with a message saying what to write instead, and
their errors never echo the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

SecretResolver = Callable[[str], str]

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
LITERAL_KEY = ("a literal API key is not accepted in a config (configs are stored as Prefect flow-run "
               "parameters, readable in its database and UI); name where the key lives instead: "
               "api_key_env: OPENAI_API_KEY (an environment variable) or api_key_secret: <block name> "
               "(a Prefect Secret block)")


class SecretError(RuntimeError):
    """The key a config names cannot be found (unset variable, missing block, no resolver)."""


def refuse_literal_key(value: object) -> None:
    """Field validator body for the `api_key` field every keyed config keeps only to refuse."""
    if value is not None:
        raise ValueError(LITERAL_KEY)
    return None


def check_env_name(value: str | None) -> str | None:
    """Field validator body for `api_key_env`: a variable's name, not a key pasted in its place."""
    if value is not None and not re.fullmatch(ENV_NAME, value):
        raise ValueError("api_key_env takes the name of an environment variable (e.g. OPENAI_API_KEY), not the "
                         "key itself; for a Prefect Secret block use api_key_secret: <block name>")
    return value


def check_key_source(api_key_env: str | None, api_key_secret: str | None) -> None:
    if api_key_env and api_key_secret:
        raise ValueError("set one of api_key_env and api_key_secret, not both")


def resolve_api_key(api_key_env: str | None, api_key_secret: str | None, *, default_env: str | None = None,
                    resolver: SecretResolver | None = None, who: str = "the endpoint") -> str | None:
    """The key named by a config, read now; None when none is named and `default_env` is unset too.

    A named source that yields nothing is an error (a silently missing key would only show up
    later as a 401)."""
    if api_key_secret:
        if resolver is None:
            raise SecretError(f"{who}: api_key_secret={api_key_secret!r} names a Prefect Secret block, which only "
                              "the Prefect tasks can read; outside a flow use api_key_env instead")
        try:
            value = resolver(api_key_secret)
        except Exception as e:
            raise SecretError(f"{who}: cannot read the Prefect Secret block {api_key_secret!r} ({type(e).__name__}: "
                              f"{e}); create it with `prefect block create secret` or in the UI (Blocks)") from None
        if not value:
            raise SecretError(f"{who}: the Prefect Secret block {api_key_secret!r} is empty")
        return str(value)
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise SecretError(f"{who}: api_key_env={api_key_env!r} but the environment variable {api_key_env} is not "
                              "set (or empty) in the process that sends the requests")
        return value
    if default_env:
        return os.environ.get(default_env) or None
    return None


class KeyedEndpoint(BaseModel):
    """The key fields of every config that talks to a keyed server (a teacher, a bench target)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # errors never echo a key

    api_key_env: str | None = Field(None, description="Environment variable holding the Bearer key, read when the "
                                    "client is made; neither this nor api_key_secret: openai uses $OPENAI_API_KEY.")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the Bearer key.")
    # Only there to refuse a literal key with the fix (and the file:line); never set, never dumped.
    api_key: SkipJsonSchema[None] = Field(None, exclude=True, repr=False)

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_literal_key(cls, value: Any) -> None:
        return refuse_literal_key(value)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        return check_env_name(value)

    @model_validator(mode="after")
    def _one_key_source(self):
        check_key_source(self.api_key_env, self.api_key_secret)
        return self
