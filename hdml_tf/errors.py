"""User-facing errors: one line that says what was wrong, what was expected and where."""


class HDMLError(Exception):
    """An error caused by the user's input (a file, a flag, a data set layout).

    Tools catch it at the top level and print `error: <message>` with no traceback.
    """


class DataError(HDMLError):
    """A data set is missing, incomplete or laid out differently from what its reader expects."""


class WeightsError(HDMLError):
    """A weights file does not match the backbone (missing, unexpected or mis-shaped variables)."""


class ConfigError(HDMLError, ValueError):
    """A configuration value is invalid; the message is one line meant for the user."""
