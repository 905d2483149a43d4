"""Prefect's run loggers without a traceback under an input error.

When a task or flow run fails, Prefect logs the exception with its stack. For mlxcore's input errors
(a bad data file, spec, mixture or config, a full disk, a teacher that never answers) the message
already names the file and line, the field or the fix, and forty lines of frames above it hide that
line in the terminal and in the UI's logs. `quiet_input_errors()` (run when `tasks` is imported)
drops the stack from those records only: every other exception keeps its traceback, and
`MLXFLOW_TRACEBACKS=1` keeps them all.
"""

from __future__ import annotations

import logging
import os

from mlxcore.clients.chat import TeacherError
from mlxcore.clients.secrets import SecretError
from mlxcore.config import ConfigError
from mlxcore.data import hfds
from mlxcore.data.catalog import CatalogError
from mlxcore.data.errors import DataError
from mlxcore.data.mixture import MixError
from mlxcore.data.specs import DownloadError
from mlxcore.io import WriteError

INPUT_ERRORS = (ConfigError, DataError, DownloadError, CatalogError, MixError, hfds.SpecError, hfds.RowError,
                WriteError, TeacherError, SecretError)
LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class InputErrorsWithoutStack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if isinstance(exc, INPUT_ERRORS) and os.environ.get("MLXFLOW_TRACEBACKS", "") in ("", "0"):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_errors() -> None:
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, InputErrorsWithoutStack) for f in logger.filters):
            logger.addFilter(InputErrorsWithoutStack())
