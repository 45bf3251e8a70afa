"""The one exception type for bad preference data."""

_WORKER_PREFIX = "Caught PairDataError in DataLoader worker"


class PairDataError(ValueError):
    """Bad preference-pair input; the message is one line: file (and line), problem, fix.

    A DataLoader worker's error comes back to the main process rebuilt from its whole traceback
    (torch's ExceptionWrapper); the constructor keeps the original one line.
    """

    def __init__(self, message: str = ""):
        if isinstance(message, str) and message.startswith(_WORKER_PREFIX):
            message = message.rstrip().rsplit("PairDataError: ", 1)[-1]
        super().__init__(message)
