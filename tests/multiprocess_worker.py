"""One process of a multi-process training run, for tests/test_multiprocess.py.

Run as `python tests/multiprocess_worker.py WORKDIR BENCHMARK NUM_PROCESSES PROCESS_ID PORT`
with JAX_NUM_CPU_DEVICES set: it trains the tiny config's MetaPix schedule (joint, meta,
weighted steps and the final evaluation) through the real `train.train_and_evaluate`, so the
pipeline's per-process shards, the global batch assembly and the checkpoints all take part.
NUM_PROCESSES=1 is the single-process reference.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import test as test_config  # noqa: E402
from metapix_jax import train  # noqa: E402


def worker_config(benchmark: str, num_processes: int, process_id: int, port: int):
    """The tiny config, with global batches of 4 (one row per device) and no dropout.

    Dropout is off because a multi-process global batch holds the same images as a
    single-process one in another row order (data/pipeline.py), so each image would draw
    another dropout mask; everything else is invariant to the row order.
    """
    config = test_config.get_config()
    config.data.synthetic_root = benchmark
    config.data.source_batch = config.data.target_batch = config.data.eval_batch = 4
    config.model.dropout = 0.0
    # Adam with eps 1e-8 turns float-rounding noise in near-zero meta-gradient entries
    # into full lr steps of either sign; a larger eps keeps the comparison meaningful.
    config.meta.eps = 1e-3
    config.schedule.joint_steps = 2
    config.schedule.meta_steps = 2
    config.schedule.weighted_steps = 2
    config.schedule.generations = 1
    config.eval_at_phase_end = False
    config.image_every = 0
    if num_processes > 1:
        config.distributed = "on"
        config.coordinator_address = f"localhost:{port}"
        config.num_processes = num_processes
        config.process_id = process_id
    return config


def main() -> None:
    workdir, benchmark = sys.argv[1], sys.argv[2]
    num_processes, process_id, port = (int(a) for a in sys.argv[3:6])
    train.train_and_evaluate(worker_config(benchmark, num_processes, process_id, port), workdir)


if __name__ == "__main__":
    main()
