"""mIoU: confusion matrices summed on the devices, divided on the host.

IoU_c = TP / (TP + FP + FN); a class with no ground-truth pixel and no prediction has
no IoU (NaN) and is left out of the mean, as in the Cityscapes evaluator.
"""

from collections.abc import Iterable, Sequence

import numpy as np

from metapix_jax import parallel
from metapix_jax.state import TrainState
from metapix_jax.steps import Steps


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


def confusion_over(
    state: TrainState, steps: Steps, batches: Iterable[dict[str, np.ndarray]], mesh
) -> np.ndarray:
    """Sums the eval step's confusion matrices over every batch of an eval pass."""
    total = None
    for batch in batches:
        counts = np.asarray(steps.eval(state, parallel.to_global(batch, mesh)), np.int64)
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("the evaluation split has no images")
    return total
