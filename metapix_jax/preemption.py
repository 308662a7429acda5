"""SIGTERM and SIGINT (a cluster's pre-emption, Ctrl-C): save at the next step boundary, stop.

A handler only sets a flag; the training loop reads it between steps, saves a
checkpoint and raises `Interrupted`, which main.py turns into one line and the shell's
status for "ended by a signal" (128 + signal number).
"""

import os
import signal
import threading


class Interrupted(Exception):
    """SIGTERM or SIGINT: the state was saved at a step boundary; rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # The shell's convention for "ended by a signal".


class InterruptFlag:
    """SIGTERM/SIGINT set a flag that the loop reads at step boundaries.

    A second signal of either kind ends the process at once (the default action), so a
    second Ctrl-C still aborts a run that is slow to reach its next step boundary; the
    checkpoints on disk stay valid because every save is atomic.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"{signal.Signals(signum).name}: saving a checkpoint at the next step boundary "
            "(send it again to abort now)",
            flush=True,
        )

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():  # Only there can Python.
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
