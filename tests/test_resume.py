"""Exact resume: a run killed anywhere and restarted ends bit-identical to an unbroken one.

One uninterrupted reference run of main.py on the tiny config (metapix: joint 3, then
(meta 2, weighted 2) x 2 = 11 positions, a checkpoint at every position) is compared
with one workdir that is killed again and again by the test-only fault hook
METAPIX_TEST_KILL_AT and rerun with the same command each time: inside the joint phase,
by SIGTERM inside a meta phase, in the middle of a checkpoint save, at the start of
generation 2's meta phase (the U-Net is re-initialised) and inside generation 2's
weighted phase, after damaging a finished checkpoint (the one before it is used).
Compiled programs are shared through JAX's persistent compilation cache (conftest.py),
so only the first process compiles.
"""

import os
import signal
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import run_main
from flax import serialization

from configs import test as test_config
from metapix_jax import checkpoints, parallel
from metapix_jax.faults import KILL_ENV

TOTAL = 11


def train(workdir: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """The tiny MetaPix run in `workdir`, a checkpoint at every position."""
    return run_main(
        "--config=configs/test.py",
        f"--workdir={workdir}",
        "--config.mode=train",
        "--config.checkpoint_every=1",
        "--config.eval_at_phase_end=False",
        *args,
        env=env,
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The benchmark root and the uninterrupted reference run (conftest shares the compiles)."""
    base = tmp_path_factory.mktemp("resume")
    env = {}
    data = f"--config.data.synthetic_root={base / 'benchmark'}"
    reference = str(base / "reference")
    proc = train(reference, env, data)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return env, data, reference


def final_state(workdir: str, position: int = TOTAL) -> dict:
    path = os.path.join(checkpoints.checkpoint_dir(workdir), str(position), "default")
    return ocp.StandardCheckpointer().restore(path)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    flat_a = dict(ocp.tree.to_flat_dict(a))
    flat_b = dict(ocp.tree.to_flat_dict(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), key


def temporary_dirs(workdir: str) -> list[str]:
    folder = checkpoints.checkpoint_dir(workdir)
    return [n for n in os.listdir(folder) if "tmp" in n]


def damage(workdir: str, position: int) -> None:
    """Overwrites the data files of a finished checkpoint: it can no longer be read."""
    for folder, _, files in os.walk(
        os.path.join(checkpoints.checkpoint_dir(workdir), str(position))
    ):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(b"\0garbage")


def test_killed_anywhere_and_rerun_ends_bit_identical(shared, tmp_path):
    env, data, reference = shared
    workdir = str(tmp_path / "run")
    # (fault, expected exit code, latest checkpoint left behind, what it exercises)
    faults = [
        ("position:2", -signal.SIGKILL, 1, "kill -9 inside the joint phase"),
        ("sigterm:4", 128 + signal.SIGTERM, 4, "SIGTERM inside meta_gen1"),
        ("save:6", -signal.SIGKILL, 5, "kill -9 in the middle of saving position 6"),
        ("position:8", -signal.SIGKILL, 7, "kill -9 in meta_gen2 (fresh U-Net on resume)"),
        ("position:11", -signal.SIGKILL, 10, "after a damaged checkpoint 7: resume at 6"),
    ]
    for fault, exit_code, latest, what in faults:
        proc = train(workdir, {**env, KILL_ENV: fault}, data)
        assert proc.returncode == exit_code, (what, proc.stdout[-2000:], proc.stderr[-3000:])
        assert checkpoints.finished_positions(workdir)[-1] == latest, what
        if fault.startswith("sigterm"):
            assert (
                "interrupted at position 4 of 11 (phase meta_gen1); checkpoint saved; "
                "run the same command to resume"
            ) in proc.stderr
            assert "Traceback" not in proc.stderr
        if fault.startswith("save"):
            assert temporary_dirs(workdir), "the killed save should leave its temporary dir"
            # The previous checkpoint is complete and readable.
            assert final_state(workdir, latest)["position"] == latest
        if fault == "position:8":
            damage(workdir, 7)  # The next run must fall back to checkpoint 6.
        if fault == "position:11":
            assert "checkpoint 7 in " in proc.stdout and " is unreadable" in proc.stdout
            assert "continuing from position 6 of 11" in proc.stdout
            assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", "7"))
    proc = train(workdir, env, data)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "continuing from position 10 of 11" in proc.stdout
    assert not temporary_dirs(workdir)  # The half-written save was cleaned up.
    assert_bitwise_equal(final_state(workdir), final_state(reference))
    # The check is able to fail: an earlier position's state differs from the final one.
    with pytest.raises(AssertionError):
        assert_bitwise_equal(final_state(workdir, 10), final_state(reference))


def test_a_workdir_with_another_config_is_refused_unless_allowed(shared, tmp_path):
    env, data, reference = shared
    proc = train(reference, env, data, "--config.optim.learning_rate=0.5", "--config.seed=3")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ConfigError: workdir {reference} was trained with a different")
    assert "optim.learning_rate: 0.001 -> 0.5" in last and "seed: 0 -> 3" in last
    assert "--config.allow_config_change=True" in last


def test_a_checkpoint_restores_into_a_template_that_reads_no_weights(shared, tmp_path):
    """Resume, eval and predict restore into shapes alone: init.vgg16 is never opened."""
    _, _, reference = shared
    config = test_config.get_config()
    config.init.vgg16 = str(tmp_path / "absent_vgg16.pth")  # Reading it would fail.
    manager = checkpoints.make_manager(reference)
    restored = checkpoints.restore(manager, parallel.state_template(config, parallel.make_mesh()))
    manager.close()
    assert_bitwise_equal(serialization.to_state_dict(restored), final_state(reference))


def test_eval_with_another_model_names_the_parameter_and_the_config(shared):
    env, data, reference = shared
    before = checkpoints.finished_positions(reference)
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={reference}",
        "--config.mode=eval",
        "--config.model.width=0.125",
        data,
        env=env,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModelMismatchError: checkpoint {TOTAL} in {reference}/checkpoints")
    # Width 1/16 -> 1/8: block 2's 128 channels are 8 in the checkpoint, 16 in the config.
    assert "params['block2']['conv1']['bias'] is (8,) there, (16,) in the config" in last
    assert f"({reference}/config.json)" in last
    assert checkpoints.finished_positions(reference) == before  # Nothing moved or removed.
