"""Faults: non-finite steps (stop / skip), signals, corrupted dataset files.

Everything but one subprocess runs in this process: a NaN is injected by wrapping the batch
source, signals are sent to ourselves, corrupted PNGs go through the real loaders.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import test as test_config
from metapix_jax import checkpoints, methods, nonfinite, preemption, train
from metapix_jax import state as state_lib
from metapix_jax.data import datasets, sources, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """direct_joint on the tiny config: joint 3 + joint_gen1 2 = 5 positions, one step kind."""
    config = test_config.get_config()
    config.mode = "train"
    config.method = "direct_joint"
    config.schedule.generations = 1
    config.checkpoint_every = 1
    config.log_every = 1
    config.image_every = 0
    config.eval_at_phase_end = False
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    d = tiny_config().data
    synthetic.write_benchmark(
        root,
        seed=0,
        height=d.height,
        width=d.width,
        num_source=d.synthetic_num_source,
        num_target_train=d.synthetic_num_target_train,
        num_target_val=d.synthetic_num_target_val,
    )
    # Real GTA5 has a few images whose size differs from their label's: training must go
    # through them (each is resized on its own), so this benchmark has one.
    odd = sorted(glob.glob(f"{root}/gta5/images/*.png"))[0]
    image = Image.open(odd).convert("RGB")
    image.resize((d.width + 6, d.height + 3), Image.Resampling.BICUBIC).save(odd)
    return root


def inject_nan_at(monkeypatch, bad_position: int) -> None:
    """Wraps the batch source: the batch of the step to `bad_position` gets a NaN pixel."""
    original = datasets.Datasets.train_batches

    def with_nan(self, position):
        for next_position, batch in enumerate(original(self, position), start=position + 1):
            if next_position == bad_position:
                batch["target_image"] = batch["target_image"].copy()
                batch["target_image"][0, 0, 0, 0] = np.nan
            yield batch

    monkeypatch.setattr(datasets.Datasets, "train_batches", with_nan)


def saved(workdir: str, position: int) -> dict:
    path = os.path.join(checkpoints.checkpoint_dir(workdir), str(position), "default")
    return ocp.StandardCheckpointer().restore(path)


def test_nan_stops_with_the_step_named_then_skip_completes(
    monkeypatch, bench_root, tmp_path, caplog
):
    workdir = str(tmp_path)
    inject_nan_at(monkeypatch, 4)
    config = tiny_config()
    config.data.synthetic_root = bench_root
    with pytest.raises(nonfinite.NonFiniteError) as error:
        train.train_and_evaluate(config, workdir)
    # The first source epoch (4 steps of 2) went through the benchmark's odd-sized image.
    assert caplog.text.count("each is resized to the training size separately") == 1
    message = str(error.value)
    assert "step 1 of phase joint_gen1 (position 4 of 5)" in message
    assert "loss=nan" in message and "last checkpoint (position 3) is intact" in message
    assert checkpoints.finished_positions(workdir) == [2, 3]  # Nothing saved after the NaN.
    assert int(saved(workdir, 3)["position"]) == 3
    # The same workdir with 'skip' (an exempt field): resumes at 3 and completes.
    config.nonfinite = "skip"
    result = train.train_and_evaluate(config, workdir)
    assert result["nonfinite_skipped"] == 1 and result["position"] == 5
    before, after = saved(workdir, 3), saved(workdir, 4)
    assert int(after["position"]) == 4 and int(after["step"]) == int(before["step"])
    pairs = zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)  # The skipped step changed nothing.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved(workdir, 5)["params"]))


def test_guard_flags_and_skips_inside_the_jitted_step():
    """The wrapper on a toy step: bit-identical state on a bad step, position moves on."""

    def step(state, batch):
        loss = jnp.sum(batch["x"])
        return state.replace(params=state.params + loss), {"loss": loss}

    state = state_lib.TrainState(
        params=jnp.arange(3.0), opt_state=(), unet_params=(), unet_opt_state=(),
        rng=jnp.zeros(2, jnp.uint32), step=jnp.int32(0), position=jnp.int32(0),
    )  # fmt: skip
    skip = jax.jit(methods.advancing(nonfinite.guard(step, skip=True)))
    stop = jax.jit(methods.advancing(nonfinite.guard(step, skip=False)))
    good, bad = {"x": jnp.ones(2)}, {"x": jnp.array([1.0, jnp.inf])}
    new, m = skip(state, good)
    assert float(m["nonfinite"]) == 0 and np.array_equal(new.params, [2.0, 3.0, 4.0])
    new, m = skip(state, bad)
    assert float(m["nonfinite"]) == 1 and int(new.position) == 1
    np.testing.assert_array_equal(new.params, state.params)
    new, m = stop(state, bad)
    assert float(m["nonfinite"]) == 1 and not np.isfinite(new.params).any()


def test_first_signal_sets_the_flag_second_aborts():
    code = (
        "import os, signal, time\n"
        "from metapix_jax import preemption\n"
        "with preemption.InterruptFlag() as flag:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.1)\n"
        "    print('flag', flag.signum, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "    print('not reached', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert f"flag {int(signal.SIGINT)}" in proc.stdout
    assert "not reached" not in proc.stdout
    assert proc.returncode == -signal.SIGINT
    # Outside the context the previous handler is back (Python's default, or SIG_IGN where
    # the suite runs as a background job of a non-interactive shell).
    before = signal.getsignal(signal.SIGINT)
    with preemption.InterruptFlag():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


def corrupt(path: str, rng: np.random.Generator) -> str:
    """Damages a PNG one of four ways; returns which."""
    data = bytearray(open(path, "rb").read())
    kind = ["flip", "truncate", "empty", "text"][rng.integers(4)]
    if kind == "flip":
        for i in rng.integers(8, len(data), size=int(rng.integers(1, 6))):
            data[i] ^= 0xFF
    elif kind == "truncate":
        data = data[: int(rng.integers(1, len(data)))]
    elif kind == "empty":
        data = bytearray()
    else:
        data = bytearray(b"this is not a png\n")
    with open(path, "wb") as f:
        f.write(bytes(data))
    return kind


def read_everything(root: str, config) -> None:
    """Every file through the real loaders: one epoch of each training stream, the eval split."""
    d = config.data
    data = datasets.get_datasets(config, "/nonexistent", with_source=True)
    streams = (
        ("source", data.source, d.source_batch),
        ("target", data.target_train, d.target_batch),
    )
    for domain, examples, rows in streams:
        stream = data.stream(examples, domain, 0)
        for _ in range(-(-len(examples) // rows)):
            next(stream)
    list(data.eval_batches())


def test_fuzz_corrupted_dataset_files_give_a_data_error_naming_the_file(bench_root, tmp_path):
    rng = np.random.default_rng(1234)
    files = sorted(glob.glob(f"{bench_root}/**/*.png", recursive=True))
    files = [f for f in files if "/harmful/" not in f]
    outcomes = {"clean": 0, "error": 0}
    for case in range(12):
        root = str(tmp_path / f"case{case}")
        shutil.copytree(bench_root, root)
        victims = rng.choice(files, size=int(rng.integers(1, 4)), replace=False)
        damaged = {os.path.join(root, os.path.relpath(v, bench_root)): None for v in victims}
        for path in damaged:
            damaged[path] = corrupt(path, rng)
        config = tiny_config()
        config.data.synthetic_root = root
        try:
            read_everything(root, config)
            outcomes["clean"] += 1
        except sources.DataError as e:
            assert any(path in str(e) for path in damaged), (damaged, str(e))
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] >= 6, outcomes  # Most damage is detected, not decoded as noise.


def test_corrupted_data_mid_run_keeps_the_checkpoints(bench_root, tmp_path):
    """A resumed run that meets a damaged image: one line from main.py, checkpoints intact."""
    root = str(tmp_path / "bench")
    shutil.copytree(bench_root, root)
    for path in glob.glob(f"{root}/gta5/images/*.png"):
        with open(path, "r+b") as f:
            f.truncate(100)
    workdir = str(tmp_path / "run")
    os.makedirs(checkpoints.checkpoint_dir(workdir))
    # A checkpoint from before the damage, made without training (the fresh state).
    config = tiny_config()
    config.data.synthetic_root = root
    manager = checkpoints.make_manager(workdir)
    fresh = state_lib.init_state(config)
    checkpoints.save(manager, fresh)
    manager.close()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = ["--config=configs/test.py", f"--workdir={workdir}", "--config.mode=train"]
    args += ["--config.method=direct_joint", "--config.schedule.generations=1"]
    proc = subprocess.run(
        [sys.executable, "main.py", *args, f"--config.data.synthetic_root={root}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("DataError: cannot read") and "/gta5/images/" in last
    manager = checkpoints.make_manager(workdir)
    restored = checkpoints.restore(manager, fresh)
    assert int(restored.position) == 0 and checkpoints.finished_positions(workdir) == [0]
