"""The one exception type users see: a bad input, named with its source and the problem."""


class InputError(ValueError):
    """Raised for input that cannot be used; the message names the file (or argument) and the problem."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class Cancelled(RuntimeError):
    """Raised inside a long loop when the caller asked it to stop; nothing is written after it."""


class Terminated(BaseException):
    """SIGTERM turned into an exception (``pdiqsm`` installs the handler), so that unwinding removes a
    run's staged outputs as an interrupt does; like KeyboardInterrupt, not caught by ``except Exception``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
