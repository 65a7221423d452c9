"""One error type for bad user input, so the entry point can print one line and exit."""


class MegolmoConfigError(ValueError):
    """Bad configuration or input data: the message names the culprit (file, key, value)."""
