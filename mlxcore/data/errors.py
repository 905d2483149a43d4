"""The error bad input data raises (`mlxcore.data.records` and the modules it reads rows with)."""


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` (or the file alone)."""
