"""Evaluation: confusion matrices summed on the devices, mIoU on the host, and eval mode.

The confusion counts of a batch come from `steps.confusion_counts` (a jitted step).

IoU_c = TP / (TP + FP + FN); a class with no ground-truth pixel and no prediction has
no IoU (NaN) and is left out of the mean, as in the Cityscapes evaluator. Under the
official protocol (data.eval_protocol='full') the logits are upsampled to the native
label size before the argmax; the result equals cityscapesscripts' evaluator
(tests/test_eval_protocol.py).
"""

import json
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from metapix_jax import checkpoints, console, faults, filesystem, parallel, steps
from metapix_jax.data import datasets as datasets_lib
from metapix_jax.data import labels
from metapix_jax.state import TrainState

# ---- the maths --------------------------------------------------------------------------


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU from a [C, C] matrix (rows = ground truth); NaN where undefined."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """nanmean of the per-class IoU (NaN if no class is defined at all)."""
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


# The SYNTHIA -> Cityscapes convention of the field: SYNTHIA has no terrain, truck or train,
# so mIoU is reported over the other 16 classes, and over 13 (also without wall, fence and
# pole). The MetaPix paper (Table 2) does not list the classes; these are the train ids of
# the evaluation code shared by the UDA literature it compares with (e.g. FDA's and
# ProDA's `synthia_set_16` / `synthia_set_13`).
SYNTHIA_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def subset_mean_iou(confusion: np.ndarray, classes: Sequence[int]) -> float:
    """nanmean of the 19-class IoUs of `classes` (IoUs from the full confusion matrix)."""
    iou = iou_per_class(confusion)[list(classes)]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def summarize(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
    """A JSON-ready result: mIoU, per-class IoU by name (None where undefined), pixel acc."""
    iou = iou_per_class(confusion)
    total = confusion.sum()
    return {
        "miou": mean_iou(confusion),
        "per_class_iou": {
            name: (None if np.isnan(v) else float(v))
            for name, v in zip(class_names, iou, strict=True)
        },
        "pixel_accuracy": float(np.trace(confusion) / total) if total else float("nan"),
        "labeled_pixels": int(total),
    }


# ---- the eval loop ----------------------------------------------------------------------


def confusion_over(
    state: TrainState, confusion_fn: Callable, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh
) -> np.ndarray:
    """Sums the confusion matrices (steps.confusion_counts) over every batch of an eval pass.

    The sum stays on the devices (no copy per batch) and moves to the host as int64
    before an int32 cell could overflow (2^31 pixels: about 1,000 full-size Cityscapes
    images).
    """
    total, running, pixels, seen = 0, None, 0, 0
    for batch in batches:
        counts = confusion_fn(state, parallel.to_global(batch, mesh))
        running = counts if running is None else running + counts
        pixels, seen = pixels + batch["label"].size * jax.process_count(), seen + 1
        if pixels >= 2**30:  # Leaves room for one more batch of up to 2^30 pixels.
            total, running, pixels = total + np.asarray(running, np.int64), None, 0
    if not seen:
        raise ValueError("the evaluation split has no images")
    return total + (0 if running is None else np.asarray(running, np.int64))


def evaluation_result(
    confusion: np.ndarray, state: TrainState, config: ml_collections.ConfigDict
) -> dict:
    """The JSON-ready evaluation of a state: mIoU, per-class IoU and where it was taken."""
    result = {
        "method": config.method,
        "position": int(state.position),
        "segmenter_steps": int(state.step),
        "eval_split": config.data.target_eval_split,
        "eval_protocol": config.data.eval_protocol,
        **summarize(confusion, labels.CLASS_NAMES),
    }
    if config.data.source_kind == "synthia":  # The field's 16- and 13-class means.
        result["miou_16"] = subset_mean_iou(confusion, SYNTHIA_16)
        result["miou_13"] = subset_mean_iou(confusion, SYNTHIA_13)
    return result


def result_path(workdir: str, position: int) -> str:
    """WORKDIR/eval/eval_<position>.json: written last, so it marks a finished evaluation."""
    return os.path.join(workdir, "eval", f"eval_{position:08d}.json")


def write_result(result: dict, workdir: str, writer) -> None:
    """eval/latest.json, eval/eval_<position>.json (process 0) and TensorBoard scalars.

    Each file is written atomically and eval_<position>.json last, so its presence means
    the evaluation of that position finished (train.py redoes a phase-end evaluation that
    a kill interrupted).
    """
    scalars = {f"eval/{k}": result[k] for k in ("miou", "miou_16", "miou_13") if k in result}
    ious = result["per_class_iou"].items()
    scalars.update({f"eval/iou/{k}": v for k, v in ious if v is not None})
    writer.write_scalars(result["position"], scalars)
    writer.flush()
    if jax.process_index() == 0:
        path = result_path(workdir, result["position"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = json.dumps(result, indent=2)
        filesystem.write_atomically(os.path.join(os.path.dirname(path), "latest.json"), text)
        filesystem.write_atomically(path, text)


def run_evaluation(
    state: TrainState,
    confusion_fn: Callable,
    data: datasets_lib.Datasets,
    mesh: Mesh,
    workdir: str,
    writer,
) -> dict:
    """mIoU on the target eval split; written as JSON in the workdir and to TensorBoard."""
    config = data.config
    confusion = confusion_over(state, confusion_fn, data.eval_batches(), mesh)
    result = evaluation_result(confusion, state, config)
    faults.during_evaluation(result["position"])
    write_result(result, workdir, writer)
    miou = 100 * result["miou"]
    console.say(config.method, f"eval at position {result['position']}: mIoU {miou:.2f}")
    return result


# ---- eval mode --------------------------------------------------------------------------


def restore_for_reading(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> TrainState:
    """The checkpoint at config.eval_checkpoint, or (-1) the latest readable one (an
    unreadable newer one is skipped with a warning and left in place), replicated over
    `mesh`.

    For the modes that read a trained run (eval, predict, compare's weight separation).
    A position asked for by number is that checkpoint or an error, never another one.
    """
    manager = checkpoints.make_manager(workdir)
    try:
        if manager.latest_step() is None:
            raise checkpoints.NoCheckpointError(checkpoints.no_checkpoint_message(workdir))
        template = parallel.state_template(config, mesh)
        faults.at_startup("restore")
        if config.eval_checkpoint < 0:
            state = checkpoints.restore_latest_readable(manager, template, move_unreadable=False)
        else:
            state = restore_position(manager, template, config.eval_checkpoint)
    finally:
        manager.close()
    return parallel.put_replicated(state, mesh)


def restore_position(manager, template: TrainState, position: int) -> TrainState:
    """The checkpoint at `position`; one that cannot be read is an UnreadableCheckpointError
    (NoCheckpointError and ModelMismatchError, which say more, pass as they are)."""
    try:
        return checkpoints.restore(manager, template, position)
    except (checkpoints.NoCheckpointError, checkpoints.ModelMismatchError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way.
        positions = ", ".join(map(str, sorted(manager.all_steps())))
        raise checkpoints.UnreadableCheckpointError(
            f"checkpoint {position} in {manager.directory} is unreadable "
            f"({checkpoints.one_line(e)}); choose another --config.eval_checkpoint "
            f"(the positions there: {positions}; -1 = the latest readable)"
        ) from e


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Eval mode: mIoU of the latest checkpoint, or of the one at config.eval_checkpoint."""
    from clu import metric_writers  # Imported where used: it brings the writers' backend.

    parallel.initialize_distributed(config)  # Before anything touches a device.
    mesh = parallel.make_mesh()
    state = restore_for_reading(config, workdir, mesh)
    data = datasets_lib.get_datasets(config, workdir, with_source=False, with_train=False)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    with metric_writers.ensure_flushes(writer):
        confusion_fn = steps.make_inference(config, mesh).confusion
        return run_evaluation(state, confusion_fn, data, mesh, workdir, writer)
