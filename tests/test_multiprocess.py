"""Two processes on loopback train to the same params as one process with four devices.

Each process has 2 CPU devices and runs the real training loop: its input pipeline reads
only its share of every global batch, `jax.make_array_from_process_local_data` joins the
shares, and gloo carries the gradient all-reduce between the processes.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from metapix_jax import checkpoints, parallel
from metapix_jax import state as state_lib

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
import multiprocess_worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, benchmark, num_processes: int, process_id: int, port: int, devices: int):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    args = [str(workdir), str(benchmark), str(num_processes), str(process_id), str(port)]
    return subprocess.Popen(
        [sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_all(processes) -> None:
    outputs = [p.communicate(timeout=1200)[0].decode() for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]


def final_params(workdir, config):
    manager = checkpoints.make_manager(str(workdir))
    # Saved over 4 devices (one or two processes), restored here on one: the template decides.
    state = checkpoints.restore(manager, parallel.state_template(config, parallel.make_mesh()))
    manager.close()
    return jax.tree.map(np.asarray, jax.device_get(state))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    benchmark, port = root / "benchmark", free_port()
    # The two-process run goes first, so that it also writes the benchmark (process 0
    # writes, process 1 waits at a barrier); the reference runs beside it on a copy.
    two = [launch(root / "two", benchmark, 2, i, port, devices=2) for i in range(2)]
    one = [launch(root / "one", root / "benchmark_one", 1, 0, 0, devices=4)]
    wait_all(two + one)
    return root


def test_two_processes_match_one_process_with_four_devices(runs):
    config = multiprocess_worker.worker_config(str(runs / "benchmark"), 1, 0, 0)
    one, two = final_params(runs / "one", config), final_params(runs / "two", config)
    assert int(one.position) == int(two.position) == 6  # 2 joint + 2 meta + 2 weighted steps.
    for name in ("params", "opt_state", "unet_params", "unet_opt_state"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
            getattr(one, name),
            getattr(two, name),
        )
    # The steps moved the params away from the start, so the comparison is not vacuous.
    start = jax.tree.map(np.asarray, state_lib.init_state(config))
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), one.params, start.params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    results = [json.loads((runs / r / "eval" / "latest.json").read_text()) for r in ("one", "two")]
    assert results[0]["labeled_pixels"] == results[1]["labeled_pixels"] > 0
    assert results[0]["miou"] == pytest.approx(results[1]["miou"], abs=1e-6)
