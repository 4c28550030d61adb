"""A clean stop on SIGINT/SIGTERM: the trainer finishes the current optimizer step, saves its state and stops."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_SECONDS = 2.0
"""A signal this soon after the first is the same request: under a multi-process launch one Ctrl-C reaches each
worker twice, from the terminal (its process group) and passed on by the launcher (torchrun's agent forwards it)."""


class StopRequest:
    """Set by SIGINT/SIGTERM: the trainer finishes the current optimizer step, saves its state and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.at = 0.0

    def __bool__(self) -> bool:
        return self.signal is not None

    def request(self, signum: int) -> None:
        """Record a stop request (what the signal handler does)."""
        self.signal, self.at = signum, time.monotonic()

    def arm(self) -> None:
        """Before the state save: from now on a signal ends the process at once (the system's default action), even
        while the save is inside a long native call (a multi-GB write or fsync, where no Python handler could run)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT/SIGTERM while training: the first asks for a clean stop, a second one ends the process at once.

    A repeat within ``DUPLICATE_SECONDS`` of the first is taken for the same request (one Ctrl-C under a launcher);
    a later one, or any once the trainer has called ``stop.arm()`` before its state save, ends the process. The
    previous complete state stays in place (``finetune.state`` renames a finished state folder into place).
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not stop:
            logger.warning("%s received: saving the training state after this step (again to abort)", name)
            stop.request(signum)
        elif time.monotonic() - stop.at < DUPLICATE_SECONDS:
            logger.info("%s again at once: the same stop request (one Ctrl-C under a launcher)", name)
        else:
            stop.arm()
            os.kill(os.getpid(), signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
