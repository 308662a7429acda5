"""Runs every step kind on a 1-device and a 4-device mesh; prints their differences as JSON.

For tests/test_parallel.py, in a subprocess started with JAX_NUM_CPU_DEVICES=4 (the device
count is fixed when JAX starts). Both meshes get the same global batches, so the params
after a few steps of each kind, the metrics and the eval confusion matrix must agree.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from configs import test as test_config  # noqa: E402
from metapix_jax import methods, parallel  # noqa: E402
from metapix_jax import state as state_lib  # noqa: E402
from metapix_jax import steps as steps_lib  # noqa: E402

KINDS = ("joint", "target", "meta", "weighted")


def batches(config, count: int):
    """Random source/target batches (the same for both meshes)."""
    rng = np.random.default_rng(0)
    b, h, w = config.data.source_batch, config.data.height, config.data.width
    for _ in range(count):
        yield {
            "source_image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
            "source_label": rng.integers(0, 19, (b, h, w)).astype(np.int32),
            "target_image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
            "target_label": rng.integers(0, 19, (b, h, w)).astype(np.int32),
        }


def run(config, mesh: Mesh) -> dict:
    """Two steps of each kind in turn, then one eval batch; returns host arrays."""
    steps = methods.compile_steps(config, mesh, methods.PHASE_KINDS)
    state = parallel.put_replicated(state_lib.init_state(config), mesh)
    stream = batches(config, 2 * len(KINDS) + 1)
    metrics = {}
    for kind in KINDS:
        for i in range(2):
            state, m = steps[kind](state, parallel.to_global(next(stream), mesh))
            metrics.update({f"{kind}{i}/{k}": v for k, v in m.items()})
    last = next(stream)
    eval_batch = {"image": last["target_image"], "label": last["target_label"]}
    confusion = steps_lib.make_inference(config, mesh).confusion(
        state, parallel.to_global(eval_batch, mesh)
    )
    sharded = len(state.params["score"]["kernel"].sharding.device_set)
    return jax.device_get({"state": state, "metrics": metrics, "confusion": confusion}), sharded


def max_relative_difference(a, b) -> float:
    """max |a - b| / max(max |a|, 1e-3) over the leaves of two pytrees.

    The floor is for leaves that are float rounding noise around zero: the U-Net's conv
    biases sit before an instance norm, which removes them, so their gradient is exactly
    zero in real arithmetic and about 1e-13 in float32, differently on every mesh.
    """
    floor = lambda x: max(float(np.abs(x).max()), 1e-3)  # noqa: E731
    diffs = jax.tree.map(lambda x, y: float(np.abs(x - y).max()) / floor(x), a, b)
    return max(jax.tree.leaves(diffs))


def main() -> None:
    config = test_config.get_config()
    config.data.source_batch = config.data.target_batch = config.data.eval_batch = 4
    # Adam with eps 1e-8 turns float-rounding noise in near-zero meta-gradient entries
    # into full lr steps of either sign; a larger eps keeps the comparison meaningful.
    config.meta.eps = 1e-3
    one, devices_one = run(config, Mesh(np.array(jax.devices()[:1]), ("data",)))
    four, devices_four = run(config, parallel.make_mesh())
    report = {
        "device_count": jax.device_count(),
        "mesh_devices": [devices_one, devices_four],
        "params": max_relative_difference(one["state"].params, four["state"].params),
        "unet_params": max_relative_difference(one["state"].unet_params, four["state"].unet_params),
        "opt_state": max_relative_difference(one["state"].opt_state, four["state"].opt_state),
        "metrics": max_relative_difference(one["metrics"], four["metrics"]),
        "confusion_equal": bool(np.array_equal(one["confusion"], four["confusion"])),
        "confusion_total": int(one["confusion"].sum()),
        "position": [int(one["state"].position), int(four["state"].position)],
    }
    config.data.source_batch = 6  # Does not split over 4 devices.
    problems = parallel.batch_size_problems(config, jax.device_count(), jax.process_count())
    report["batch_error"] = "\n".join(problems) or None
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
