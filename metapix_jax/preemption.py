"""SIGTERM and SIGINT (a cluster's pre-emption, Ctrl-C): stop at once, or save at the next step.

One `InterruptFlag` serves a whole run: main.py (cli.run) installs it right after parsing
the flags, before anything slow, and the training loop reads the same flag. Its handler
answers a first signal in one of two ways:

- at once (`at_once=True`: start-up, evaluation, anything outside the training steps).
  Nothing half-done there is worth keeping (restoring, initialising, compiling, writing
  the benchmark, evaluating), so the process ends now: the registered cleanups run (the
  workdir lock's note), one line goes to stderr and the status is 128 + signal number. It
  ends with `os._exit`, not an exception, so no library code is left half-way through a
  lock or a thread join and no `KeyboardInterrupt` traceback is printed. Every file the
  run writes is written atomically, so an exit at any bytecode loses nothing saved.
- at the next step boundary (inside `at_step_boundaries()`: the training loop). The
  handler only sets the flag; the loop reads it between steps, saves a checkpoint and
  raises `Interrupted`, which main.py turns into one line and the same status.

A second signal of either kind ends the process at once (the default action), so a
second Ctrl-C still aborts a run that is slow to reach its next step boundary; the
checkpoints on disk stay valid because every save is atomic.
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

AT_ONCE_MESSAGE = (
    "interrupted by {name} outside the training steps (start-up or evaluation); stopped at "
    "once, the checkpoints on disk are intact; run the same command to resume"
)


class Interrupted(Exception):
    """SIGTERM or SIGINT: the state was saved at a step boundary; rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # The shell's convention for "ended by a signal".


_active: "InterruptFlag | None" = None  # The installed flag, which the training loop reads.


class InterruptFlag:
    """SIGTERM/SIGINT set a flag that the loop reads at step boundaries, or (`at_once`, and
    outside `at_step_boundaries()`) end the process at once with one line."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, at_once: bool = False):
        self.signum: int | None = None
        self.at_once = at_once
        self.previous: dict[int, object] = {}
        self.cleanups: list[Callable[[], None]] = []  # Run before an exit at once.

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.at_once:
            self.stop_now()
        print(
            f"{signal.Signals(signum).name}: saving a checkpoint at the next step boundary "
            "(send it again to abort now)",
            flush=True,
        )

    def stop_now(self) -> None:
        """Runs the cleanups, prints the line and ends the process with 128 + signal."""
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # A handler may interrupt a write to them.
                stream.flush()
        line = AT_ONCE_MESSAGE.format(name=signal.Signals(self.signum).name)
        os.write(2, (line + "\n").encode())  # Not print: the stream may be mid-write.
        os._exit(128 + self.signum)

    @contextlib.contextmanager
    def at_step_boundaries(self) -> Iterator["InterruptFlag"]:
        """Inside: a first signal only sets the flag (the training loop saves and stops at
        its next step boundary). Leaving normally with the flag set (a signal during the
        last evaluation) stops at once if the flag did so outside."""
        at_once, self.at_once = self.at_once, False
        try:
            yield self
        finally:
            self.at_once = at_once
        if self.signum is not None and at_once:
            self.stop_now()

    def __enter__(self) -> "InterruptFlag":
        global _active
        if threading.current_thread() is threading.main_thread():  # Only there can Python.
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        if _active is None:
            _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if _active is self:
            _active = None


@contextlib.contextmanager
def handling_signals() -> Iterator[InterruptFlag]:
    """The flag main.py installed (so start-up and the loop share one), or, for a library
    caller, a new one that answers the same way (at once outside the training steps)."""
    if _active is not None:
        yield _active
        return
    with InterruptFlag(at_once=True) as flag:
        yield flag


def on_stop(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Registers `cleanup` to run if the installed flag stops the process at once; returns
    a function that unregisters it."""
    flag = _active
    if flag is None:
        return lambda: None
    flag.cleanups.append(cleanup)
    return lambda: cleanup in flag.cleanups and flag.cleanups.remove(cleanup)
