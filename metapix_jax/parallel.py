"""Data parallelism: one `data` mesh axis over every device of every process.

The state is replicated (`P()`), batches are split along their first axis
(`P('data')`), and XLA inserts the gradient all-reduce. The same jitted steps run on one
CPU, eight GPUs or several hosts after `jax.distributed.initialize()`.
"""

import functools
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metapix_jax import hrselect, meta, nonfinite
from metapix_jax import state as state_lib
from metapix_jax import steps as steps_lib

DISTRIBUTED_MODES = ("auto", "on", "off")
# Variables by which a launcher says that it started several processes.
PROCESS_COUNT_VARIABLES = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def launched_as_several_processes() -> bool:
    """Whether the environment names a coordinator or more than one process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(v) or 1) > 1 for v in PROCESS_COUNT_VARIABLES)


def _int_or_none(value: int, variable: str) -> int | None:
    """A config value if set (>= 0), else the environment variable's, else None (jax decides)."""
    if value >= 0:
        return value
    text = os.environ.get(variable)
    return int(text) if text else None


def distributed_arguments(config: ml_collections.ConfigDict) -> dict:
    """Arguments of jax.distributed.initialize; None leaves a value to the cluster detection."""
    return {
        "coordinator_address": config.coordinator_address or None,  # jax reads the env var.
        "num_processes": _int_or_none(config.num_processes, "JAX_NUM_PROCESSES"),
        "process_id": _int_or_none(config.process_id, "JAX_PROCESS_ID"),
    }


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """Joins the processes of a multi-process run; returns whether it initialised.

    Must run before anything touches a JAX device (so train.py calls it first). 'auto'
    initialises only when the config or the environment names several processes, so a
    single-process run never waits for a coordinator; 'on' always does (jax then detects
    SLURM, Open MPI, Kubernetes or Cloud TPU); 'off' never does.
    """
    if config.distributed not in DISTRIBUTED_MODES:
        raise ValueError(
            f"distributed must be one of {DISTRIBUTED_MODES}, got {config.distributed!r}"
        )
    if config.distributed == "off" or jax.distributed.is_initialized():
        return False
    if config.distributed == "auto" and not (
        config.coordinator_address or config.num_processes > 1 or launched_as_several_processes()
    ):
        return False
    jax.distributed.initialize(**distributed_arguments(config))
    return True


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
    devices, processes = jax.device_count(), jax.process_count()
    for field in ("source_batch", "target_batch", "eval_batch"):
        size = config.data[field]
        if size <= 0 or size % devices or size % processes:
            raise ValueError(
                f"data.{field}={size} must be a positive multiple of the {devices} devices "
                f"(over {processes} processes)"
            )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's share of a batch into global arrays split over `data`."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def state_template(config: ml_collections.ConfigDict, mesh: Mesh) -> state_lib.TrainState:
    """What a checkpoint restores into: the state's shapes, replicated over `mesh`."""
    return state_lib.state_template(config, replicated(mesh))


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
