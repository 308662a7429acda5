"""SIGTERM and SIGINT (a cluster's pre-emption, Ctrl-C): save at a step boundary, stop.

A handler only sets a flag; the training loop asks `InterruptFlag.reached(position)` after
every step, and where it answers yes it saves a checkpoint and raises `Interrupted`, which
main.py turns into one line and the shell's status for "ended by a signal" (128 + signal
number).

One process stops at the first step boundary after the signal. Several processes cannot:
every step is a collective, so a process that stops to save while the others step on
leaves all of them waiting for each other (the hang of a multi-host run pre-empted one host
at a time). They must agree on one position, and jax's distributed runtime has the protocol
for it: `jax.distributed.initialize` starts a preemption sync manager
(`jax_enable_preemption_service`, on by default) whose native SIGTERM handler posts a
notice to the coordination service; every process then reports the last position it
passed to `multihost_utils.reached_preemption_sync_point`, and that call answers yes on
every process at the same position, one past the furthest reported. The call takes a
mutex and compares two integers (about 2 us on a busy CPU): the loop still never waits for
the device per step. (Orbax's `CheckpointManager.reached_preemption` asks the same.)

Python's handler (installed after `jax.distributed.initialize`) replaces the native one
at the OS level, so the flag keeps the native handler's address (`NativeNotifier`, read
with sigaction(2)) and calls it on the first SIGTERM or SIGINT: the notice then goes out
as the library intends, and this process still knows which signal it got (for its exit
status) and still aborts on a second one. The notice is held back until the loop has
reported a position, so that the agreed position is never one the run has already passed.

Exit statuses of a multi-process run: a process that got the signal exits with 128 + its
signal number; the others exit with 128 + the signal number of the lowest-numbered
process that got one (SIGTERM if none of them saw it), so that every task of the job
reports "interrupted, resume me", and their message names the process and the signal.

A process that dies (kill -9, a crashed host) cannot take part in the protocol. Where the
others' next collective fails (gloo notices the closed connections at once), they end
with one line (`lost_process_message`, `exit_now`); where nothing fails (a frozen host, a
collective that waits on a dead peer), the distributed runtime ends them once the lost
process has missed its heartbeats for `config.heartbeat_timeout` seconds, with its own
fatal line and an abort: jax 0.10.2's `initialize` takes no callback for it, and the
client's callback cannot be handed the status in this jaxlib (it aborts on a bad cast).

Outside the training steps (start-up, evaluation) a first signal ends the process at once
(`at_once`): nothing half-done there is worth keeping (restoring, initialising, compiling,
writing the benchmark, evaluating), so the registered cleanups run (the workdir lock's
note), one line goes to stderr and the status is 128 + signal number, through `os._exit`
so that no library code is left half-way through a lock and no `KeyboardInterrupt`
traceback is printed. Every file the run writes is written atomically, so such an exit
loses nothing saved. main.py (cli.run) installs the one flag of a run right after parsing
the flags; `jax.distributed.initialize` then installs its native handler over it, and
`NativeNotifier.capture` puts Python's back.
"""

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

import numpy as np

AT_ONCE_MESSAGE = (
    "interrupted by {name} outside the training steps (start-up or evaluation); stopped at "
    "once, the checkpoints on disk are intact; run the same command to resume"
)


class Interrupted(Exception):
    """SIGTERM or SIGINT: the state was saved at a step boundary; rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # The shell's convention for "ended by a signal".


def os_handler(signum: int) -> int:
    """The address of the handler the OS runs for `signum` (0 = SIG_DFL, 1 = SIG_IGN).

    Read with sigaction(2), which sees handlers installed by native code, unlike
    `signal.getsignal`. The handler is the first member of `struct sigaction` on Linux and
    macOS; the buffer is larger than the struct on both.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    action = ctypes.create_string_buffer(256)
    if libc.sigaction(signum, None, action) != 0:
        return 0
    return ctypes.c_void_p.from_buffer(action).value or 0


class NativeNotifier:
    """The SIGTERM handler that jax's preemption notifier installed, callable from Python."""

    address: int | None = None  # Set by `capture`; None: no native notifier to call.

    @classmethod
    @contextlib.contextmanager
    def capture(cls) -> Iterator[None]:
        """Around `jax.distributed.initialize`: keeps the SIGTERM handler it installs.

        Only a handler that the call itself installed counts, so that Python's own
        trampoline (a handler installed from Python earlier) is never taken for it.
        """
        before = os_handler(signal.SIGTERM)
        yield
        after = os_handler(signal.SIGTERM)
        if after not in (before, int(signal.SIG_DFL), int(signal.SIG_IGN)):
            cls.address = after
        if _active is not None and _active.previous:  # Python's handler, back on top.
            for s in _active.SIGNALS:
                signal.signal(s, _active.handle)

    @classmethod
    def notify(cls) -> bool:
        """Tells the preemption notifier that this process got its signal; False if none."""
        if cls.address is None:
            return False
        ctypes.CFUNCTYPE(None, ctypes.c_int)(cls.address)(signal.SIGTERM)
        return True


_active: "InterruptFlag | None" = None  # The installed flag, which the training loop reads.


class InterruptFlag:
    """SIGTERM/SIGINT set a flag that the loop reads at step boundaries (`reached`), or
    (`at_once`, outside `at_step_boundaries()`) end the process at once with one line.

    A second signal of either kind ends the process at once (the default action), so a
    second Ctrl-C still aborts a run that is slow to reach its next step boundary; the
    checkpoints on disk stay valid because every save is atomic.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, at_once: bool = False):
        self.signum: int | None = None
        self.at_once = at_once
        self.previous: dict[int, object] = {}
        self.cleanups: list[Callable[[], None]] = []  # Run before an exit at once.
        self.coordinated: bool | None = None  # Several processes; known at the first report.
        self.notified = False

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.at_once:
            self.stop_now()
        several = several_processes() if self.coordinated is None else self.coordinated
        where = "the position all processes agree on" if several else "the next step boundary"
        print(
            f"{signal.Signals(signum).name}: saving a checkpoint at {where} "
            "(send it again to abort now)",
            flush=True,
        )
        if self.coordinated:  # Else the first report sends the notice (see `reached`).
            self._notify()

    def _notify(self) -> None:
        """Sends the notice once; without a native notifier, the signal's default action
        (the other processes then end as when a process dies)."""
        if self.notified:
            return
        self.notified = True
        if not NativeNotifier.notify():
            print(
                "no preemption notifier (jax_enable_preemption_service is off): ending this "
                "process without a checkpoint",
                file=sys.stderr,
                flush=True,
            )
            signal.signal(self.signum, signal.SIG_DFL)
            os.kill(os.getpid(), self.signum)

    def reached(self, position: int) -> bool:
        """Whether the run stops to save at `position`, a step boundary just passed.

        One process: after any signal. Several: at the position every process agrees on
        (the library's sync point); the loop must call this at every position it passes,
        starting with the one it resumes from.
        """
        if self.coordinated is None:
            self.coordinated = several_processes()
        if not self.coordinated:
            return self.signum is not None
        from jax.experimental import multihost_utils

        reached = multihost_utils.reached_preemption_sync_point(position)
        if self.signum is not None:
            self._notify()  # A signal before the first report: only now is it safe.
        return reached

    def interruption(self, where: str) -> Interrupted:
        """The exception that ends the run after its checkpoint at `where` (e.g. 'position
        4 of 11 (phase meta_gen1)'). Several processes: a collective, at the sync point."""
        message = "checkpoint saved; run the same command to resume"
        if not self.coordinated:
            return Interrupted(f"interrupted at {where}; {message}", self.signum)
        from jax.experimental import multihost_utils

        signums = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0)))
        if self.signum is not None:
            return Interrupted(f"interrupted at {where}; {message}", self.signum)
        got = [(p, int(s)) for p, s in enumerate(signums.ravel()) if s]
        process, signum = got[0] if got else (None, int(signal.SIGTERM))
        sender = f"process {process}" if got else "another process"
        name = signal.Signals(signum).name
        return Interrupted(f"interrupted at {where} ({sender} got {name}); {message}", signum)

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


# ---- a process that died -------------------------------------------------------------------

# How the runtime words a failed collective: XLA status codes that begin the message of the
# error raised where the host next dispatches to or waits for the devices.
RUNTIME_STATUSES = ("UNKNOWN:", "INTERNAL:", "UNAVAILABLE:", "ABORTED:", "DEADLINE_EXCEEDED:")
RUNTIME_STATUSES += ("CANCELLED:", "FAILED_PRECONDITION:")


def several_processes() -> bool:
    """Whether this is one process of a multi-process run (never starts the backend)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def lost_process_message(error: BaseException) -> str | None:
    """One line for a runtime error of a multi-process run (a collective failed, most
    often because another process died), or None for any other error."""
    if not several_processes():
        return None
    import jax

    text = str(error).strip()
    if not (isinstance(error, jax.errors.JaxRuntimeError) or text.startswith(RUNTIME_STATUSES)):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    return (
        f"DistributedError: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{first} (another process probably died; the checkpoints are intact: run the same "
        "command on every host to resume)"
    )


def exit_now(message: str, exit_code: int) -> NoReturn:
    """Prints `message` on stderr and ends the process at once.

    For a process of a multi-process run that stops alone: a normal exit runs the
    distributed runtime's shutdown barrier (atexit), which waits for every other process,
    and those wait inside a collective for this one; the barrier gives up only after its
    timeout and then aborts with a stack trace. Ending at once closes this process's
    connections, so the others' collectives fail at once and they end the same way.
    """
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(exit_code)


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
