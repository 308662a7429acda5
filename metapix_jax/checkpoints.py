"""Orbax checkpoints: one kept at the end of every phase, plus rolling periodic ones.

Checkpoints are numbered by the schedule position (steps of any kind taken), so the
latest one says exactly where to resume: which phase, which step inside it, and (since
the input streams are functions of the position) which batch comes next.

A save is atomic: Orbax writes `<position>.orbax-checkpoint-tmp...` and renames it when
complete, so a crash mid-save leaves the earlier checkpoints as they were; the training
manager removes such leftovers when it starts. A finished checkpoint that still cannot be
read (e.g. a damaged disk) is moved to `unreadable_checkpoints/` and the one before it
is used.
"""

import os
import re
import shutil
from collections.abc import Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from metapix_jax.state import TrainState

FINISHED = re.compile(r"^\d+$")  # A finished checkpoint folder; temporary ones have suffixes.


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def finished_positions(workdir: str) -> list[int]:
    """Positions with a finished (renamed) checkpoint folder, read without Orbax."""
    folder = checkpoint_dir(workdir)
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if FINISHED.match(n))


def make_manager(
    workdir: str,
    keep_positions: Sequence[int] = (),
    keep_periodic: int = 2,
    cleanup: bool = False,
) -> ocp.CheckpointManager:
    """A manager that keeps every position in `keep_positions` and the latest few others.

    `cleanup` removes temporary folders of interrupted saves: only for the run that owns
    the workdir (training), never for a reader that may run beside it.
    """
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(max(keep_periodic, 1)),
            checkpoint_managers.CustomSteps(list(keep_positions)),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=cleanup,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Saves the state under its own position (atomically: a crash keeps the old ones)."""
    position = int(state.position)
    if manager.latest_step() == position:
        return
    manager.save(position, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


class NoCheckpointError(FileNotFoundError):
    """A mode that reads a trained run found no checkpoint in its workdir."""


def no_checkpoint_message(workdir: str) -> str:
    return (
        f"no checkpoint in {checkpoint_dir(workdir)}: train first (mode=train) or point "
        "--workdir at a trained run"
    )


class ModelMismatchError(ValueError):
    """A checkpoint holds other parameter shapes than the configured model has."""


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_model(manager: ocp.CheckpointManager, template: TrainState, position: int) -> None:
    """Names the parameters whose saved shape differs from the template's, before Orbax
    fails on the first one with a message that names none (e.g. eval with another width).
    """
    path = epath.Path(manager.directory) / str(position) / "default"
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = handler.metadata(path)
    finally:
        handler.close()
    differences = []
    for field in ("params", "unet_params"):
        have, want = _shapes(saved[field]), _shapes(getattr(template, field))
        for key in sorted(have.keys() | want.keys()):
            if have.get(key) != want.get(key):
                found, expected = have.get(key, "absent"), want.get(key, "absent")
                differences.append(f"{field}{key} is {found} there, {expected} in the config")
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        workdir = os.path.dirname(str(manager.directory))
        raise ModelMismatchError(
            f"checkpoint {position} in {manager.directory} holds another model than the "
            f"config describes: {differences[0]}{more}; use the config it was trained with "
            f"({os.path.join(workdir, 'config.json')})"
        )


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
    check_model(manager, template, position)
    return manager.restore(position, args=ocp.args.StandardRestore(template))


def set_aside(manager: ocp.CheckpointManager, position: int) -> str:
    """Moves an unreadable checkpoint out of the manager's way (kept for inspection)."""
    folder = os.path.join(os.path.dirname(str(manager.directory)), "unreadable_checkpoints")
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, str(position))
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.move(os.path.join(str(manager.directory), str(position)), dest)
    manager.reload()
    return dest


def restore_latest_readable(
    manager: ocp.CheckpointManager, template: TrainState
) -> TrainState | None:
    """The newest checkpoint that restores; unreadable newer ones are set aside.

    Nothing is moved unless an older checkpoint does restore: when none does (e.g. the
    model changed shape under allow_config_change), the newest one's error is raised.
    """
    positions = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, Exception]] = []
    for position in positions:
        try:
            state = restore(manager, template, position)
        except Exception as e:  # noqa: BLE001 - any failure to read means: try the one before.
            failures.append((position, e))
            continue
        for bad, error in failures:
            dest = set_aside(manager, bad)
            message = (
                f"checkpoint {bad} is unreadable ({type(error).__name__}: {error}); moved to {dest}"
            )
            logging.warning(message)
            print(f"warning: {message.splitlines()[0]}", flush=True)
        return state
    if failures:
        raise failures[0][1]
    return None
