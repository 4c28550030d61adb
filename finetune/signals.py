"""A clean stop on SIGINT/SIGTERM: the trainer finishes the current optimizer step, saves its state and stops."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGINT/SIGTERM: the trainer finishes the current optimizer step, saves its state and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def request(self, signum: int) -> None:
        """Record a stop request (what the signal handler does)."""
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT/SIGTERM while training: the first asks for a clean stop, a second one ends the process at once.

    After the first signal both go back to the system's default action, so the second kills the process even while
    the state save is inside a long native call (a multi-GB write or fsync, where no Python handler could run);
    the previous complete state stays in place (``finetune.state`` renames a finished state folder into place).
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        logger.warning(
            "%s received: saving the training state after this step (again to abort)", signal.Signals(signum).name
        )
        stop.request(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
