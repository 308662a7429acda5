"""Non-finite losses and gradients: flag them inside the jitted step, optionally skip them.

Every training step's metrics hold its losses and gradient norms, so "all metrics are
finite" is "the loss and the gradient are finite" (a gradient with a NaN or an inf has a
non-finite norm). The wrapper adds a `nonfinite` flag (1.0 on a bad step) that the host
reads only when it logs or saves, so the loop never waits on the device per step. With
`skip`, a bad step leaves the state as it was, except that the position moves on (the
next step reads the next batch and the schedule stays on time).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from metapix_jax.state import TrainState

FLAG = "nonfinite"


def all_finite(metrics: dict[str, jax.Array]) -> jax.Array:
    """True when every metric value is finite (a scalar bool array)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))


def guard(step: Callable, skip: bool) -> Callable:
    """`step` with a `nonfinite` metric; with `skip`, bad steps only advance the position."""

    def guarded(state: TrainState, batch: dict[str, jax.Array]):
        new_state, metrics = step(state, batch)
        finite = all_finite(metrics)
        if skip:
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = kept.replace(position=new_state.position)
        return new_state, {**metrics, FLAG: 1.0 - finite.astype(jnp.float32)}

    return guarded
