"""Orbax checkpoints: one kept at the end of every phase, plus rolling periodic ones.

Checkpoints are numbered by the schedule position (steps of any kind taken), so the
latest one says exactly where to resume: which phase, which step inside it, and (since
the input streams are functions of the position) which batch comes next.

A save is atomic: Orbax writes `<position>.orbax-checkpoint-tmp...` and renames it when
complete, so a crash mid-save leaves the earlier checkpoints as they were; the training
manager removes such leftovers when it starts.

Integrity: every save records a CRC-32 of every array (of the host copy of the state) in
the checkpoint's own metadata (Orbax's `custom_metadata`, written inside the temporary
folder, so it is part of the atomic save), and every restore recomputes them. Orbax and
TensorStore check only the index of their files, not the data (a flipped bit in a data
file reads back as a different number without an error). A mismatch makes the checkpoint
unreadable, like one whose files are damaged: training moves it to
`unreadable_checkpoints/` and uses the one before it; the readers (eval, predict,
compare) skip it without moving it, since a training run may be writing beside them.
Checkpoints written before the checksums existed are restored unverified.
"""

import json
import logging as pylogging
import os
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from metapix_jax.state import TrainState

FINISHED = re.compile(r"^\d+$")  # A finished checkpoint folder; temporary ones have suffixes.
CHECKSUMS = "metapix_crc32"  # The key of the checksums in the checkpoint's custom metadata.
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-checkpoint metadata file (JSON).


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


def _crc32(array) -> str:
    """CRC-32 of an array's bytes, as 8 hex digits (any dtype: its bytes are read as uint8)."""
    return f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)):08x}"


def checksums(state) -> dict[str, str]:
    """CRC-32 of every array of a state, by its path in the tree (of the host copies).

    CRC-32 finds every single-bit flip and most other damage, at memory speed: a check
    against accidents, not against someone who edits the files on purpose.
    """
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): _crc32(leaf) for path, leaf in flat}


class _OrbaxThreadErrors(pylogging.Filter):
    """Drops Orbax's logs of an error in one of its writer threads (each with a traceback)
    and asyncio's "Task exception was never retrieved" for its writer tasks: the same
    error reaches `save`'s caller as an exception, which main.py reports in one line
    (e.g. a full disk)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        orbax_thread = "orbax" in record.pathname and "raised an exception" in record.getMessage()
        unretrieved = record.name == "asyncio" and "never retrieved" in record.getMessage()
        return not (orbax_thread or unretrieved)


_QUIET = _OrbaxThreadErrors()

# After a failed save (a full disk), Orbax's pending writer coroutines are collected at exit
# unawaited, and Python warns of each after main.py's one line; the save's error says it all.
warnings.filterwarnings(
    "ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning
)


def _closed_loop_ignored(hook):
    """sys.unraisablehook without "Event loop is closed": after a failed write (a full
    disk), TensorStore's callbacks still post to Orbax's closed event loop, dozens of
    tracebacks ahead of the one line that main.py prints for the save's own error."""

    def unraisablehook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            hook(unraisable)

    return unraisablehook


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Saves the state under its own position (atomically: a crash keeps the old ones),
    with the checksums of its arrays."""
    position = int(state.position)
    if manager.latest_step() == position:
        return
    # Process 0 writes the checkpoint's metadata; the others' would be ignored.
    metadata = {CHECKSUMS: checksums(state)} if jax.process_index() == 0 else None
    loggers = [pylogging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(_QUIET)
    hook, sys.unraisablehook = sys.unraisablehook, _closed_loop_ignored(sys.unraisablehook)
    manager.save(position, args=ocp.args.StandardSave(state), force=True, custom_metadata=metadata)
    manager.wait_until_finished()
    # Only after a save that worked: after a failed one its writer tasks are collected
    # later (at exit), and their duplicate reports stay quiet.
    for logger in loggers:
        logger.removeFilter(_QUIET)
    sys.unraisablehook = hook


class NoCheckpointError(FileNotFoundError):
    """A mode that reads a trained run found no checkpoint in its workdir."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint (or every checkpoint) of a workdir cannot be read back."""


class ChecksumMismatchError(ValueError):
    """A restored array differs from what was written: the data changed on disk."""


def saved_checksums(directory: str, position: int) -> dict[str, str] | None:
    """The checksums recorded with a checkpoint, or None (written before they existed)."""
    with open(os.path.join(directory, str(position), STEP_METADATA)) as f:
        metadata = json.load(f)
    return (metadata.get("custom_metadata") or {}).get(CHECKSUMS)


def verify(state, directory: str, position: int) -> None:
    """Raises ChecksumMismatchError naming the first array whose checksum differs."""
    expected = saved_checksums(directory, position)
    if expected is None:
        return
    found = checksums(state)
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ChecksumMismatchError(
            f"{wrong[0]}{more} does not match the checksum written with it: the data "
            "changed on disk after the save"
        )


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


def missing_position_message(directory: str, position: int, positions: Sequence[int]) -> str:
    there = ", ".join(map(str, positions)) or "none"
    return (
        f"config.eval_checkpoint={position}: no checkpoint at that position in {directory}; "
        f"the positions there: {there} (-1 = the latest)"
    )


def restore(
    manager: ocp.CheckpointManager, template: TrainState, position: int | None = None
) -> TrainState | None:
    """The state at `position` (default: the latest), laid out like `template`; or None.

    The arrays' checksums are verified (ChecksumMismatchError if one differs).
    """
    if position is None:
        position = manager.latest_step()
        if position is None:
            return None
    elif position not in manager.all_steps():
        positions = sorted(manager.all_steps())
        raise NoCheckpointError(missing_position_message(manager.directory, position, positions))
    check_model(manager, template, position)
    state = manager.restore(position, args=ocp.args.StandardRestore(template))
    verify(state, str(manager.directory), position)
    return state


def one_line(error: BaseException) -> str:
    """'Type: first line of the message', for a warning or an error about a checkpoint."""
    text = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text.strip()}"


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
    manager: ocp.CheckpointManager, template: TrainState, move_unreadable: bool = True
) -> TrainState | None:
    """The newest checkpoint that restores (checksums verified), or None if there is none.

    Every mode that reads a checkpoint comes here: resuming training (`move_unreadable`:
    unreadable newer ones are moved to `unreadable_checkpoints/`, out of the manager's
    way) and the readers, eval, predict and compare (which skip them and leave them in
    place: a training run may be writing beside them, and a reader must not change its
    workdir). Each skipped checkpoint gets the same warning, naming it and why.

    Nothing is moved unless an older checkpoint does restore. When none does, the error
    is raised: ModelMismatchError as it is (the config describes another model), any
    other as UnreadableCheckpointError naming the newest checkpoint and its error.
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
            what = f"checkpoint {bad} in {manager.directory} is unreadable ({one_line(error)})"
            if move_unreadable:
                message = f"{what}; moved to {set_aside(manager, bad)}"
            else:
                message = f"{what}; skipped and left in place (a training run may be writing there)"
            logging.warning(message)
            print(f"warning: {message}", flush=True)
        return state
    if failures:
        newest, error = failures[0]
        if isinstance(error, ModelMismatchError):
            raise error
        raise UnreadableCheckpointError(
            f"no checkpoint in {manager.directory} can be read (the newest, {newest}: "
            f"{one_line(error)}); restore the folder from a copy, or move it away to start over"
        ) from error
    return None
