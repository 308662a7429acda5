"""Orbax checkpoints: one kept at the end of every phase, plus rolling periodic ones.

Checkpoints are numbered by the schedule position (steps of any kind taken), so the
latest one says exactly where to resume: which phase, which step inside it, and (since
the input streams are functions of the position) which batch comes next.
"""

import os
from collections.abc import Sequence

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from metapix_jax.state import TrainState


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(
    workdir: str, keep_positions: Sequence[int] = (), keep_periodic: int = 2
) -> ocp.CheckpointManager:
    """A manager that keeps every position in `keep_positions` and the latest few others."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(max(keep_periodic, 1)),
            checkpoint_managers.CustomSteps(list(keep_positions)),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Saves the state under its own position (atomically: a crash keeps the old ones)."""
    position = int(state.position)
    if manager.latest_step() == position:
        return
    manager.save(position, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def restore(
    manager: ocp.CheckpointManager, template: TrainState, position: int | None = None
) -> TrainState | None:
    """The state at `position` (default: the latest), laid out like `template`; or None."""
    if position is None:
        position = manager.latest_step()
        if position is None:
            return None
    elif position not in manager.all_steps():
        raise ValueError(
            f"eval_checkpoint={position}: no checkpoint at that position in "
            f"{manager.directory}; there are {sorted(manager.all_steps())}"
        )
    return manager.restore(position, args=ocp.args.StandardRestore(template))
