"""One error type for bad user input, so the entry point can print one line and exit."""


class MegolmoConfigError(ValueError):
    """Bad configuration or input data: the message names the culprit (file, key, value)."""


class RendezvousError(Exception):
    """The ranks could not meet at the rendezvous address: the message names the address, the port, the timeout
    and the variables that set them. Each rank finds it out on its own, with no peer to blame or agree with."""
