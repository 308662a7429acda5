"""Test-only fault injection, read once from METAPIX_TEST_KILL_AT when a run starts.

'position:P' kills the process (SIGKILL) right after the step to position P, before it is
saved; 'sigterm:P' and 'sigint:P' send that signal there; 'save:P' kills it in the
middle of saving position P (after the data is written, before Orbax's atomic rename).
The tests use it to interrupt runs at exact points. When the variable is unset, nothing
here touches the training loop: the steps are not wrapped and Orbax is not patched.
"""

import os
import signal
from collections.abc import Callable

KILL_ENV = "METAPIX_TEST_KILL_AT"
SIGNALS = {"position": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


def _die_in_the_next_save() -> None:
    """Makes Orbax's next atomic rename kill the process instead (a crash mid-save)."""
    from orbax.checkpoint._src.path import atomicity

    async def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die


def after_step_hook() -> Callable[[int], None] | None:
    """What to do after the step to each position, or None when no fault is asked for."""
    action, _, at = os.environ.get(KILL_ENV, "").partition(":")
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
