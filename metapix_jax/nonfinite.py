"""Non-finite losses and gradients: flagged inside the jitted step, checked on the host.

Every training step's metrics hold its losses and gradient norms, so "all metrics are
finite" is "the loss and the gradient are finite" (a gradient with a NaN or an inf has a
non-finite norm). `guard` adds a `nonfinite` flag (1.0 on a bad step) to a step; with
`skip`, a bad step leaves the state as it was. The host reads the flags only when it logs
or saves (`Checker`), so the loop never waits on the device per step, and with 'stop' no
checkpoint is ever written from a state that followed a bad step.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

FLAG = "nonfinite"
MODES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was not finite (config.nonfinite='stop')."""


def all_finite(metrics: dict[str, jax.Array]) -> jax.Array:
    """True when every metric value is finite (a scalar bool array)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))


def guard(step: Callable, skip: bool) -> Callable:
    """`step` with a `nonfinite` metric; with `skip`, a bad step changes nothing."""

    def guarded(state, batch: dict[str, jax.Array]):
        new_state, metrics = step(state, batch)
        finite = all_finite(metrics)
        if skip:
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, {**metrics, FLAG: 1.0 - finite.astype(jnp.float32)}

    return guarded


class Checker:
    """The steps' flags since the last check, read only at checks (log time, before saves)."""

    def __init__(self, mode: str, total: int):
        self.mode = mode
        self.total = total
        self.pending: list[tuple[int, dict]] = []
        self.skipped = 0

    def record(self, position: int, step_metrics: dict) -> None:
        self.pending.append((position, step_metrics))

    def check(self, phase, last_checkpoint: int | None) -> int:
        """Raises NonFiniteError ('stop'); returns the steps skipped since the last check."""
        pending, self.pending = jax.device_get(self.pending), []
        bad = [(p, m) for p, m in pending if m[FLAG] > 0]
        if bad and self.mode == "stop":
            raise NonFiniteError(self._message(phase, *bad[0], last_checkpoint))
        self.skipped += len(bad)
        return len(bad)

    def _message(self, phase, position: int, values: dict, last_checkpoint: int | None) -> str:
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(values.items()) if k != FLAG)
        kept = "none yet" if last_checkpoint is None else f"position {last_checkpoint}"
        return (
            f"non-finite loss or gradient at step {position - phase.start} of phase "
            f"{phase.name} (position {position} of {self.total}): {shown}; stopped without "
            f"saving; the last checkpoint ({kept}) is intact: rerun to resume from it, or "
            "set --config.nonfinite=skip to skip such steps"
        )
