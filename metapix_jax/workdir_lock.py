"""One writing run per workdir: a second one ends at once, naming the first.

Two runs on one workdir race on the same checkpoints (each deletes what the other's
preservation policy keeps, both rename into the same folders) and end in crashes or a
silently mixed run. Train and compare hold `WORKDIR/run.lock` for as long as they run;
eval, predict and results do not: they only read checkpoints (skipping, never moving, one
that cannot be read) and write their own files atomically, so they may run beside a
training run, which is how a run in progress is evaluated.

The lock is `filelock.FileLock`: flock(2), which the kernel releases when the holder
ends however it ends (kill -9 included), so a lock is never left held by a dead process;
on a file system without flock it falls back to filelock's marker file, which it breaks
when the process named in it is gone. Beside it, `run.lock.json` names the holder (pid,
host, start time, command) for the message a second run prints; finding that note left
behind by a holder that ended without releasing means its process is gone, which is
reported as a takeover.

Multi-host runs: only process 0 takes the lock. The processes of one run share one
workdir, so a lock per process would need names per process index, and two runs with the
same index would still collide only where both have that index; process 0 is the one
that writes the run's own files (config.json, eval JSON) and the one a launcher's log
shows first. A second run's process 0 ends at once with the message, and its other
processes end when the coordinator they wait for is gone.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import filelock

from metapix_jax import filesystem, preemption

LOCK_FILE = "run.lock"
OWNER_FILE = "run.lock.json"


class WorkdirInUseError(RuntimeError):
    """Another run holds the workdir's lock; the message names it."""


def _this_run() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def read_owner(workdir: str) -> dict | None:
    """The note of the run that holds (or held) the lock, or None."""
    try:
        with open(os.path.join(workdir, OWNER_FILE)) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another run (which has not written its details yet)"
    return (
        f"process {owner.get('pid', '?')} on {owner.get('host', '?')} "
        f"(started {owner.get('started', '?')})"
    )


def in_use_message(workdir: str, owner: dict | None) -> str:
    return (
        f"{workdir} is in use by {describe_owner(owner)}: wait until it ends or stop it, or "
        "choose another --workdir"
    )


@contextlib.contextmanager
def hold(workdir: str, holder: bool = True) -> Iterator[None]:
    """Holds the workdir's lock while the block runs (only where `holder`: process 0).

    Raises WorkdirInUseError at once if another run holds it. The workdir must exist.
    """
    if not holder:
        yield
        return
    lock = filelock.FileLock(os.path.join(workdir, LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        owner = read_owner(workdir)
        for _ in range(10):  # The holder writes its note right after taking the lock.
            if owner:
                break
            time.sleep(0.1)
            owner = read_owner(workdir)
        raise WorkdirInUseError(in_use_message(workdir, owner)) from None
    note = os.path.join(workdir, OWNER_FILE)
    unregister = lambda: None  # noqa: E731
    try:
        left = read_owner(workdir)
        if left:
            print(
                f"warning: taking over the lock of {workdir} from {describe_owner(left)}, "
                "which ended without releasing it",
                flush=True,
            )
        filesystem.write_atomically(note, json.dumps(_this_run()))
        unregister = preemption.on_stop(lambda: os.remove(note))
        yield
    finally:
        unregister()
        with contextlib.suppress(OSError):
            os.remove(note)
        lock.release()
