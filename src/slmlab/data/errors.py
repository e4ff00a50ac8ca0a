"""The one exception type of the data pipeline, and the check of counts that raises it."""


class DataError(ValueError):
    """Bad or inconsistent data: the message names the file, key or value at fault."""


def check_at_least(minimum: int, **values: int) -> None:
    """DataError naming the first argument that is not an integer of at least `minimum`."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise DataError(f"{key}={value!r}: must be an integer of at least {minimum}")
