"""Does bf16 learn the same pixel weights as float32? A diagnostic, not a test.

Takes a finished float32 demo (compare mode) workdir and answers two questions:

1. Gradient fidelity. At a MetaPix checkpoint, the meta-gradient dLoss^t/dphi (Eq. 5)
   and the per-pixel signal dLoss^t/dW, computed with the segmenter, the U-Net or both
   in bf16, against float32 on the same batches and dropout keys (cosine similarity).
2. Training. MetaPix's meta and weighted phases in bf16, started from the float32 run's
   own joint checkpoint at N1, so that only the precision of those phases differs:
   target mIoU and the weights' AUROC (harmful vs clean source pixels) beside float32's.

  python main.py --config=configs/demo.py --workdir=/tmp/metapix_demo
  python benchmarks/bf16_check.py --config=configs/demo.py --workdir=/tmp/metapix_demo
"""

import functools
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metapix_jax import checkpoints, compare, meta, parallel, steps, train  # noqa: E402
from metapix_jax import state as state_lib  # noqa: E402
from metapix_jax.data import datasets  # noqa: E402

flags.DEFINE_string("workdir", None, "A float32 compare-mode workdir (direct_joint, metapix).")
flags.DEFINE_integer("position", None, "MetaPix checkpoint for part 1 (default: N1 + 200).")
flags.DEFINE_integer("num_batches", 4, "Training batches for part 1.")
flags.DEFINE_bool("train", True, "Also run part 2 (the bf16 meta and weighted phases).")
config_flags.DEFINE_config_file("config", None, "The workdir's config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
PRECISIONS = (("bfloat16", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def with_dtype(config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.model.dtype = dtype
    return changed


def gradient_fns(config: ml_collections.ConfigDict, segmenter_dtype: str, unet_dtype: str):
    """jitted (batch, key) -> (dLoss^t/dphi flattened, dLoss^t/dW) at the given precisions."""
    model = state_lib.make_segmenter(with_dtype(config, segmenter_dtype))
    unet = state_lib.make_weighting_net(with_dtype(config, unet_dtype))
    loss = functools.partial(
        meta.meta_loss, model=model, unet=unet, inner=meta.inner_step(config), config=config
    )

    @jax.jit
    def grads(state, batch, key):
        d_phi = jax.grad(lambda u: loss(u, state, batch, key=key)[0])(state.unet_params)
        weights = steps.source_weights(unet, state.unet_params, batch)
        d_w = jax.grad(lambda w: loss(None, state, batch, weights=w, key=key)[0])(weights)
        return ravel_pytree(d_phi)[0], d_w

    return grads


def training_batches(config: ml_collections.ConfigDict, workdir: str, count: int) -> list:
    data = datasets.get_datasets(config, workdir, with_source=True)
    stream = data.train_batches(0)
    return [next(stream) for _ in range(count)]


def gradient_fidelity(config: ml_collections.ConfigDict, workdir: str, position: int) -> None:
    """Part 1: cosine of the bf16 gradients with float32's, batch by batch."""
    manager = checkpoints.make_manager(os.path.join(workdir, "metapix"))
    template = parallel.state_template(config, parallel.make_mesh())
    state = checkpoints.restore(manager, template, position)
    manager.close()
    batches = training_batches(config, workdir, FLAGS.num_batches)
    reference = gradient_fns(config, "float32", "float32")
    others = {p: gradient_fns(config, *p) for p in PRECISIONS}
    print(f"Part 1: cosine with float32 at MetaPix position {position} (dphi | dW)")
    columns = " | ".join(f"seg {s}, U-Net {u}" for s, u in PRECISIONS)
    print(f"| batch | norm of dphi (float32) | {columns} |")
    print("| --- | --- |" + " --- |" * len(PRECISIONS))
    for i, batch in enumerate(batches):
        key = jax.random.PRNGKey(i)
        phi_ref, w_ref = reference(state, batch, key)
        cells = []
        for p in PRECISIONS:
            phi, w = others[p](state, batch, key)
            cells.append(f"{cosine(phi, phi_ref):.3f} / {cosine(w, w_ref):.3f}")
        print(f"| {i} | {np.linalg.norm(phi_ref):.2e} | " + " | ".join(cells) + " |", flush=True)


def bf16_phases_from_joint(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Part 2: MetaPix's later phases in bf16 from the float32 joint checkpoint at N1."""
    float32 = compare.method_config(config, "metapix", workdir)
    bf16 = with_dtype(float32, "bfloat16")
    bf16.eval_at_phase_end = False
    out = os.path.join(workdir, "bf16_check", "metapix_bf16_from_float32_joint")
    shutil.rmtree(out, ignore_errors=True)
    source = checkpoints.make_manager(os.path.join(workdir, "direct_joint"))
    template = parallel.state_template(float32, parallel.make_mesh())
    joint = checkpoints.restore(source, template, float32.schedule.joint_steps)
    source.close()
    dest = checkpoints.make_manager(out)
    checkpoints.save(dest, joint)  # Same U-Net init: it depends on the seed, not the dtype.
    dest.close()
    result = train.train_and_evaluate(bf16, out)
    separation = compare.weight_separation(bf16, out)
    reference = compare.weight_separation(float32, os.path.join(workdir, "metapix"))
    with open(os.path.join(workdir, "metapix", "eval", "latest.json")) as f:
        reference_miou = json.load(f)["miou"]
    print("Part 2: MetaPix's meta and weighted phases from the same float32 joint checkpoint")
    print("| phases in | target mIoU | AUROC | mean weight harmful / clean |")
    print("| --- | --- | --- | --- |")
    for name, miou, s in (
        ("float32", reference_miou, reference),
        ("bfloat16", result["miou"], separation),
    ):
        weights = f"{s['mean_weight_harmful']:.3f} / {s['mean_weight_clean']:.3f}"
        print(f"| {name} | {100 * miou:.2f} | {s['auroc']:.3f} | {weights} |")


def main(_) -> None:
    config = FLAGS.config
    workdir = os.path.abspath(FLAGS.workdir)
    config = compare.method_config(config, "metapix", workdir)
    position = FLAGS.position or config.schedule.joint_steps + 200
    gradient_fidelity(config, workdir, position)
    if FLAGS.train:
        bf16_phases_from_joint(FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
