"""Can the meta-gradient see the harmful source pixels? A diagnostic, not a test.

At a checkpoint, computes each source pixel's meta-signal dL_t/dW: the change of the
target loss after one inner step (Algorithm 2) per unit of that pixel's weight, averaged
over several target batches. Positive = training on the pixel raises the target loss.
On the embedded benchmark it prints how well the signal alone separates the known
harmful pixels from the clean ones (AUROC), overall and per written label. This is what
the weighting U-Net has to learn from; if it cannot separate them, neither can MetaPix.

  python benchmarks/meta_signal.py --config=configs/demo.py \\
      --workdir=/tmp/metapix_demo/direct_joint --position=600 \\
      --config.data.synthetic_root=/tmp/metapix_demo/benchmark
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metapix_jax import checkpoints, compare, meta, parallel  # noqa: E402
from metapix_jax import state as state_lib  # noqa: E402
from metapix_jax.data import datasets, labels, sources  # noqa: E402

flags.DEFINE_string("workdir", None, "A run's workdir (with checkpoints).")
flags.DEFINE_integer("position", None, "Checkpoint position (default: the latest).")
flags.DEFINE_integer("num_source", 20, "Source images (one batch, no flip).")
flags.DEFINE_integer("num_target_batches", 10, "Target train batches to average over.")
config_flags.DEFINE_config_file("config", None, "A config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(_) -> None:
    config = FLAGS.config
    manager = checkpoints.make_manager(FLAGS.workdir)
    state = checkpoints.restore(
        manager, parallel.state_template(config, parallel.make_mesh()), FLAGS.position
    )
    if state is None:
        raise SystemExit(f"no checkpoint in {checkpoints.checkpoint_dir(FLAGS.workdir)}")
    data = datasets.get_datasets(
        config, os.path.dirname(os.path.abspath(FLAGS.workdir)), with_source=True
    )
    images = datasets.Head(data.source, FLAGS.num_source)
    one_batch = ml_collections.ConfigDict(config.to_dict())
    one_batch.data.eval_batch = len(images)
    source = next(datasets.Datasets(one_batch, None, None, None).eval_batches(images))
    signal_fn = jax.jit(
        jax.grad(
            lambda w, batch: meta.meta_loss(
                None,
                state,
                batch,
                model=state_lib.make_segmenter(config),
                unet=None,
                inner=meta.inner_step(config),
                config=config,
                weights=w,
                key=jax.random.PRNGKey(0),
            )[0]
        )
    )
    targets = data.stream(data.target_train, "target", 0)
    signal = np.zeros(source["label"].shape)
    for _ in range(FLAGS.num_target_batches):
        t = next(targets)
        batch = {
            "source_image": source["image"],
            "source_label": source["label"],
            "target_image": t["image"],
            "target_label": t["label"],
        }
        signal += np.asarray(signal_fn(jnp.ones(signal.shape), batch))
    signal /= FLAGS.num_target_batches
    names = [images.name(i) for i in range(len(images))]
    report(signal, source["label"], names, config.data.ignore_label)


def class_centred(signal: np.ndarray, label: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The signal minus its mean over the pixels of the same labeled class: what is left to
    learn from under weighting.normalization='class' (at W = 1, the gradient with respect
    to the class-normalised weights). 'batch' subtracts one constant, which no AUROC sees."""
    out = np.zeros_like(signal)
    for k in np.unique(label[valid]):
        pixels = valid & (label == k)
        out[pixels] = signal[pixels] - signal[pixels].mean()
    return out


def report(signal: np.ndarray, label: np.ndarray, names: list[str], ignore_label: int) -> None:
    """Prints the separation of harmful and clean pixels by the signal, and its mean: a
    positive mean says one step on the source raises the target loss on average, which
    drives every weight down when the weights are not normalised."""
    valid = label != ignore_label
    print(
        f"mean dL_t/dW over labeled pixels: {signal[valid].mean():+.3e} "
        f"({100 * (signal[valid] > 0).mean():.1f}% of them positive)"
    )
    masks = [datasets.harmful_mask_path(name) for name in names]
    if not all(os.path.exists(m) for m in masks):
        return
    harmful = np.stack([sources.read_mask(m) for m in masks])
    h, c = harmful & valid, ~harmful & valid
    if not h.any():
        print("no harmful pixels in these images (a control)")
        return
    centred = class_centred(signal, label, valid)
    print(f"mean dL_t/dW: harmful {signal[h].mean():+.3e}, clean {signal[c].mean():+.3e}")
    print(f"AUROC of the signal (harmful above clean): {compare.auroc(signal[c], signal[h]):.3f}")
    print(
        "AUROC of the class-centred signal (weighting.normalization='class'): "
        f"{compare.auroc(centred[c], centred[h]):.3f}"
    )

    def mean(mask: np.ndarray) -> str:
        return f"{signal[mask].mean():+.3e}" if mask.any() else "(none)"

    for k in np.unique(label[h]):
        name = labels.CLASS_NAMES[k]
        print(
            f"  written label {name:12s} harmful {mean(h & (label == k))}  "
            f"clean {mean(c & (label == k))}"
        )


if __name__ == "__main__":
    app.run(main)
