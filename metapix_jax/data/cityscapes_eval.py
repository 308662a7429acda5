"""The official Cityscapes pixel-level evaluator, runnable in this project's environment.

    CITYSCAPES_DATASET=/data/cityscapes CITYSCAPES_RESULTS=/path/to/labelIds_predictions \\
        python -m metapix_jax.data.cityscapes_eval

runs `cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling` exactly as its own command
line does (`csEvalPixelLevelSemanticLabeling`): ground truth
$CITYSCAPES_DATASET/gtFine/val/*/*_gtFine_labelIds.png (with the `*_gtFine_instanceIds.png`
beside them for the instance-level score), one prediction per frame under
$CITYSCAPES_RESULTS (any file named `<city>_<seq>_<frame>*.png` holding Cityscapes label ids,
searched recursively), results written to $CITYSCAPES_EXPORT_DIR (default
$CITYSCAPES_DATASET/evaluationResults)/resultPixelLevelSemanticLabeling.json. Arguments, if
any, are passed on to the evaluator unchanged.

Why a wrapper: cityscapesscripts 2.3.0 (the pinned version) calls `np.in1d` whenever it
computes the instance-level score, i.e. whenever the instanceIds files exist (always, on
real Cityscapes), and NumPy 2.4 removed `np.in1d`. The wrapper puts back an `np.in1d` with
the old semantics (a flat `np.isin`) in this process only, when NumPy lacks it, and then
runs the evaluator's own `main`. Nothing of the evaluation itself is changed.

`--train_ids_dir=DIR` first converts the `*_trainIds.png` files under DIR (what predict mode
writes with `predict.train_ids=True`) to Cityscapes label ids in $CITYSCAPES_RESULTS, which
must then be a new or empty folder: predict mode also writes colour images beside them,
which the evaluator would take for second predictions of the same frames.
"""

import os
import sys

import numpy as np

TRAIN_IDS_SUFFIX = "_trainIds.png"


def _in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False, *, kind=None):
    """NumPy < 2.4's `np.in1d`: `np.isin` on the flattened first argument."""
    return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert, kind=kind)


def restore_numpy_compat() -> None:
    """Give NumPy back `in1d` if it lacks it (NumPy >= 2.4), for cityscapesscripts 2.3.0."""
    if not hasattr(np, "in1d"):
        np.in1d = _in1d


def convert_train_ids(train_ids_dir: str, results_dir: str) -> int:
    """Write every `<name>_trainIds.png` under `train_ids_dir` as `<name>_labelIds.png` (train
    ids mapped to Cityscapes label ids, ignore to 0 'unlabeled') in `results_dir`, keeping the
    sub-folders; returns how many. The official evaluator reads label ids, predict mode writes
    train ids."""
    from PIL import Image

    from metapix_jax.data import labels, sources

    if os.path.isdir(results_dir) and os.listdir(results_dir):
        raise sources.DataError(
            f"CITYSCAPES_RESULTS={results_dir!r} is not empty: converted predictions go to a new "
            "or empty folder, so the evaluator finds one prediction per frame"
        )
    table = np.zeros(256, np.uint8)  # ignore and anything else -> 0, 'unlabeled'
    table[: labels.NUM_CLASSES] = labels.TRAIN_ID_TO_CITYSCAPES_ID
    count = 0
    for folder, _, names in sorted(os.walk(train_ids_dir)):
        for name in sorted(n for n in names if n.endswith(TRAIN_IDS_SUFFIX)):
            path = os.path.join(folder, name)
            train_ids = sources.read_label_ids(path, first_channel=False)
            if train_ids.dtype != np.uint8:
                raise sources.DataError(f"{path!r} is not an 8-bit train-id PNG")
            out_name = name[: -len(TRAIN_IDS_SUFFIX)] + "_labelIds.png"
            out = os.path.join(results_dir, os.path.relpath(folder, train_ids_dir), out_name)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            Image.fromarray(table[train_ids]).save(out)
            count += 1
    if not count:
        raise sources.DataError(f"no *{TRAIN_IDS_SUFFIX} under {train_ids_dir!r}")
    return count


def main(argv: list[str]) -> int:
    """Run the official evaluator's command line with `argv` (see the module docstring)."""
    prefix = "--train_ids_dir="
    train_ids_dirs = [a[len(prefix) :] for a in argv if a.startswith(prefix)]
    argv = [a for a in argv if not a.startswith(prefix)]
    if train_ids_dirs:
        results = os.environ.get("CITYSCAPES_RESULTS")
        if not results:
            print(
                "--train_ids_dir needs CITYSCAPES_RESULTS (where to write label ids)",
                file=sys.stderr,
            )
            return 2
        from metapix_jax.data import sources

        try:
            count = convert_train_ids(train_ids_dirs[-1], results)
        except sources.DataError as e:
            print(f"DataError: {e}", file=sys.stderr)
            return 1
        print(f"converted {count} train-id predictions to label ids in {results}")
    restore_numpy_compat()
    # Imported only now: it reads CITYSCAPES_DATASET and CITYSCAPES_EXPORT_DIR at import.
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    sys.argv = [official.__file__, *argv]
    official.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
