"""Data parallelism: one `data` mesh axis over every device of every process.

The state is replicated (`P()`), batches are split along their first axis
(`P('data')`), and XLA inserts the gradient all-reduce. The same jitted steps run on one
CPU, eight GPUs or several hosts after `jax.distributed.initialize()`.
"""

import functools

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metapix_jax import hrselect, meta, nonfinite
from metapix_jax import state as state_lib
from metapix_jax import steps as steps_lib


def make_mesh() -> Mesh:
    """A 1-D mesh named 'data' over all devices of all processes."""
    # Auto axes: XLA propagates shardings (jax >= 0.9 defaults to Explicit ones).
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Every global batch must split evenly over the devices and the processes."""
    devices = jax.device_count()
    for field in ("source_batch", "target_batch", "eval_batch"):
        size = config.data[field]
        if size <= 0 or size % devices:
            raise ValueError(
                f"data.{field}={size} must be a positive multiple of the {devices} devices"
            )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's share of a batch into global arrays split over `data`."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_replicated(tree, mesh: Mesh):
    """Places a host pytree (e.g. a fresh or restored state) on every device."""
    return jax.device_put(tree, replicated(mesh))


def make_steps(config: ml_collections.ConfigDict, mesh: Mesh) -> steps_lib.Steps:
    """Binds models and optimisers into the step functions and jits them on the mesh."""
    model = state_lib.make_segmenter(config)
    unet = state_lib.make_weighting_net(config)
    main_tx = state_lib.main_segmenter_optimizer(config)
    weighted_tx = (
        state_lib.weighted_phase_optimizer(config)
        if config.optim.fresh_weighted_optimizer
        else main_tx
    )
    segmenter = functools.partial(steps_lib.segmenter_step, model=model, unet=unet, config=config)
    meta_parts = {
        "model": model,
        "unet": unet,
        "inner_tx": state_lib.inner_optimizer(config),
        "unet_tx": state_lib.weighting_optimizer(config),
        "config": config,
    }
    rep, split = replicated(mesh), batch_sharded(mesh)

    def train_jit(fn):
        fn = nonfinite.guard(fn, skip=config.nonfinite == "skip")  # Flags (or skips) NaN steps.
        return jax.jit(fn, in_shardings=(rep, split), out_shardings=(rep, rep), donate_argnums=0)

    def eval_jit(fn):
        return jax.jit(fn, in_shardings=(rep, split), out_shardings=rep)

    return steps_lib.Steps(
        joint=train_jit(functools.partial(segmenter, tx=main_tx, source_term="unweighted")),
        target=train_jit(functools.partial(segmenter, tx=main_tx, source_term="none")),
        weighted=train_jit(functools.partial(segmenter, tx=weighted_tx, source_term="weighted")),
        meta=train_jit(
            functools.partial(
                meta.meta_step,
                model=model,
                unet=unet,
                inner_tx=state_lib.inner_optimizer(config),
                unet_tx=state_lib.weighting_optimizer(config),
                config=config,
            )
        ),
        eval=eval_jit(functools.partial(steps_lib.eval_step, model=model, config=config)),
        predict=jax.jit(
            functools.partial(steps_lib.predict, model=model),
            in_shardings=(rep, split),
            out_shardings=split,
        ),
        weights=jax.jit(
            lambda state, batch: steps_lib.source_weights(unet, state.unet_params, batch),
            in_shardings=(rep, split),
            out_shardings=split,
        ),
        finetune=train_jit(functools.partial(segmenter, tx=weighted_tx, source_term="unweighted")),
        online=train_jit(functools.partial(meta.online_step, seg_tx=weighted_tx, **meta_parts)),
        hrselect=train_jit(
            functools.partial(
                hrselect.hrselect_step, unet=unet, unet_tx=meta_parts["unet_tx"], config=config
            )
        ),
        fda=train_jit(
            functools.partial(segmenter, tx=main_tx, source_term="unweighted", restyle_source=True)
        ),
        minent=train_jit(
            functools.partial(
                segmenter,
                tx=main_tx,
                source_term="unweighted",
                entropy_weight=config.minent.weight,
            )
        ),
    )
