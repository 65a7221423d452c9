"""One error type for bad user input, so the entry point can print one line and exit."""


class MegolmoConfigError(ValueError):
    """Bad configuration or input data: the message names the culprit (file, key, value)."""


class RendezvousError(Exception):
    """The ranks could not meet at the rendezvous address: the message names the address, the port, the timeout
    and the variables that set them. Each rank finds it out on its own, with no peer to blame or agree with."""


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient norm: the message names the step
    and the first parameter whose gradient went bad. Every rank raises the same one at the same step, so the
    entry point prints it once and every rank exits on its own."""
