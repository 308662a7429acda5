"""Data parallelism: one `data` mesh axis over every device of every process.

The state is replicated (`P()`), batches are split along their first axis
(`P('data')`), and XLA inserts the gradient all-reduce. The same jitted steps run on one
CPU, eight GPUs or several hosts after `jax.distributed.initialize()`.
"""

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metapix_jax import preemption
from metapix_jax import state as state_lib

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
        "heartbeat_timeout_seconds": config.heartbeat_timeout,
    }


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """Joins the processes of a multi-process run; returns whether it initialised.

    Must run before anything touches a JAX device (so train.py calls it first). 'auto'
    initialises only when the config or the environment names several processes, so a
    single-process run never waits for a coordinator; 'on' always does (jax then detects
    SLURM, Open MPI, Kubernetes or Cloud TPU); 'off' never does.

    `config.heartbeat_timeout` bounds how long the others wait for a process that died
    without a word (kill -9, a lost host): the runtime then ends them. The SIGTERM handler
    that the runtime's preemption notifier installs is kept for the training loop's
    signal handling (preemption.py).
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
    with preemption.NativeNotifier.capture():
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


def batch_size_problems(
    config: ml_collections.ConfigDict, devices: int, processes: int
) -> list[str]:
    """Every global batch must split evenly over the devices and over the processes."""
    problems = []
    for field in ("source_batch", "target_batch", "eval_batch"):
        size = config.data[field]
        if isinstance(size, int) and size > 0 and (size % devices or size % processes):
            problems.append(
                f"config.data.{field}={size} must be a multiple of the {devices} devices "
                f"(over {processes} processes)"
            )
    return problems


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


def jit_train_step(step, mesh: Mesh):
    """A `(state, batch) -> (state, metrics)` step jitted on `mesh`: the state replicated and
    donated (updated in place), the batch split over `data`, XLA adding the all-reduce."""
    rep, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(step, in_shardings=(rep, split), out_shardings=(rep, rep), donate_argnums=0)


def jit_replicated_output(fn, mesh: Mesh):
    """A `(state, batch) -> value` function whose value every process holds whole (a sum)."""
    return jax.jit(
        fn, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh)
    )


def jit_split_output(fn, mesh: Mesh):
    """A `(state, batch) -> per-example values` function, its output split like its batch."""
    split = batch_sharded(mesh)
    return jax.jit(fn, in_shardings=(replicated(mesh), split), out_shardings=split)
