"""Random training batches, fresh states and the jitted steps on a mesh, for the step tests."""

import jax
import numpy as np

from metapix_jax import methods, parallel
from metapix_jax import state as state_lib


def random_batch(config, mesh, seed: int = 0) -> dict[str, jax.Array]:
    """A source and a target batch of normal images and uniform train ids, on `mesh`."""
    rng = np.random.default_rng(seed)
    b, h, w = config.data.source_batch, config.data.height, config.data.width
    batch = {
        "source_image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "source_label": rng.integers(0, 19, (b, h, w)).astype(np.int32),
        "target_image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "target_label": rng.integers(0, 19, (b, h, w)).astype(np.int32),
    }
    return parallel.to_global(batch, mesh)


def fresh_state(config, mesh):
    """The position-0 state, replicated over `mesh`."""
    return parallel.put_replicated(state_lib.init_state(config), mesh)


def all_steps(config, mesh) -> dict:
    """Every phase kind's step as the training loop runs it (guarded, advancing, jitted)."""
    return methods.compile_steps(config, mesh, methods.PHASE_KINDS)
