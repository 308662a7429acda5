"""Test-only fault injection, read from METAPIX_TEST_KILL_AT at fixed points of a run.

'position:P' kills the process (SIGKILL) right after the step to position P, before it is
saved; 'sigterm:P' and 'sigint:P' send that signal there; 'save:P' kills it in the
middle of saving position P (after the data is written, before Orbax's atomic rename);
'eval:P' kills it in the middle of the evaluation at position P (after the confusion
matrix, before the JSON is written). 'sigterm:STAGE' and 'sigint:STAGE' send the signal
at a named start-up stage (STARTUP_STAGES: 'restore' just before a checkpoint is read,
'initialise' before fresh networks are drawn). The tests use it to interrupt runs at
exact points. When the variable is unset, nothing here touches the training loop: the
steps are not wrapped and Orbax is not patched; the other points cost one getenv.
"""

import os
import signal
from collections.abc import Callable

KILL_ENV = "METAPIX_TEST_KILL_AT"
SIGNALS = {"position": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
STARTUP_STAGES = ("restore", "initialise")


def _fault() -> tuple[str, str]:
    action, _, at = os.environ.get(KILL_ENV, "").partition(":")
    return action, at


def at_startup(stage: str) -> None:
    """Sends the configured signal if the fault names this start-up stage."""
    action, at = _fault()
    if at == stage and action in ("sigterm", "sigint"):
        os.kill(os.getpid(), SIGNALS[action])


def during_evaluation(position: int) -> None:
    """Kills the process (SIGKILL) if the fault is 'eval:<position>'."""
    action, at = _fault()
    if action == "eval" and at == str(position):
        os.kill(os.getpid(), signal.SIGKILL)


def _die_in_the_next_save() -> None:
    """Makes Orbax's next atomic rename kill the process instead (a crash mid-save)."""
    from orbax.checkpoint._src.path import atomicity

    async def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die


def after_step_hook() -> Callable[[int], None] | None:
    """What to do after the step to each position, or None when no fault is asked for."""
    action, at = _fault()
    if action not in (*SIGNALS, "save") or not at.isdigit():
        return None

    def hook(position: int) -> None:
        if position != int(at):
            return
        if action == "save":
            _die_in_the_next_save()  # The save of this position comes next.
        else:
            os.kill(os.getpid(), SIGNALS[action])

    return hook


def wrap_steps(steps: dict[str, Callable]) -> dict[str, Callable]:
    """The steps, each followed by the hook at its new position (unchanged if none)."""
    hook = after_step_hook()
    if hook is None:
        return steps

    def wrapped(step: Callable) -> Callable:
        def run(state, batch):
            new_state, metrics = step(state, batch)
            hook(int(new_state.position))
            return new_state, metrics

        return run

    return {kind: wrapped(step) for kind, step in steps.items()}
