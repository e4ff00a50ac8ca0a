"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad or inconsistent data: the message names the file, key or value at fault."""
