"""Two processes on loopback (gloo), through main.py as a user starts them on two hosts.

Every run is the README's "without a cluster manager" command on configs/test.py
(`--config.coordinator_address/num_processes/process_id`), one CPU device per process, with
the paper's logging on: images every 3 positions, a checkpoint every 4, an evaluation at
every phase end. The tiny MetaPix schedule has 11 positions: joint 3, then (meta 2,
weighted 2) x 2.

- `reference`: a whole run; its images (drawn from rows that span both processes), its
  evaluations and checkpoints; progress lines from process 0 alone.
- `interrupted`: the same run in another workdir, SIGTERM to process 1 alone at position 1
  (both must save one position and exit with the message), then kill -9 of process 1 at
  position 9 (process 0 must end with one line, at once), then the same command, which
  must end with the reference's params.
- `stopped`: process 1 frozen (SIGSTOP, a host that stops answering): process 0 must end
  within the heartbeat timeout.
- compare mode (weight separation, weights.png, direct_joint's checkpoint reused by
  MetaPix), eval mode and predict mode on two processes; the figures that need every
  row are checked against one process.

The processes run main.py through tests/multihost_main.py, so that they share conftest's
compilation cache (see there), and process 0 compiles each program for both
(jax_share_binary_between_hosts): on two busy cores every compilation done once counts.
The first fixture compiles; the others reuse.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from metapix_jax import checkpoints, compare, parallel, predict
from metapix_jax import workdir as workdir_lib
from metapix_jax.faults import KILL_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "tests", "multihost_main.py")  # main.py, sharing compiled programs.
TOTAL = 11
HEARTBEAT = 10  # --config.heartbeat_timeout of the run whose process 1 stops answering.
WAIT = 1500  # Seconds a launch may take at most (the first one compiles every step kind).


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Launch:
    """`python main.py --config=configs/test.py ARGS` as process 0 and 1 of a run on
    loopback; output to files in `logs` (kept for a failing test's message)."""

    def __init__(self, logs, name: str, *args: str, faults: dict[int, str] | None = None):
        port = free_port()
        self.names = [os.path.join(logs, f"{name}.{i}") for i in range(2)]
        self.processes = []
        for i in range(2):
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
            env.update(PYTHONUNBUFFERED="1", JAX_SHARE_BINARY_BETWEEN_HOSTS="1")
            env.pop(KILL_ENV, None)
            if faults and i in faults:
                env[KILL_ENV] = faults[i]
            command = [sys.executable, MAIN, "--config=configs/test.py", *args]
            command += [f"--config.coordinator_address=localhost:{port}"]
            command += ["--config.num_processes=2", f"--config.process_id={i}"]
            with open(self.names[i] + ".out", "w") as out, open(self.names[i] + ".err", "w") as err:
                self.processes.append(
                    subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
                )
        self.ended: list[float | None] = [None, None]  # time.monotonic() at each exit.

    def wait(self, timeout: float = WAIT) -> "Launch":
        """Waits for both, noting when each ended; kills both after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while any(e is None for e in self.ended) and time.monotonic() < deadline:
            for i, p in enumerate(self.processes):
                if self.ended[i] is None and p.poll() is not None:
                    self.ended[i] = time.monotonic()
            time.sleep(0.2)
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        return self

    def code(self, i: int) -> int | None:
        return self.processes[i].returncode

    def out(self, i: int) -> str:
        return open(self.names[i] + ".out").read()

    def err(self, i: int) -> str:
        return open(self.names[i] + ".err").read()

    def tail(self) -> str:
        """Both processes' last output lines, for an assertion's message."""
        return "\n".join(
            f"--- process {i} (status {self.code(i)}) ---\n"
            + self.out(i)[-1500:]
            + "\n--- stderr ---\n"
            + self.err(i)[-2500:]
            for i in range(2)
        )

    def succeeded(self) -> None:
        assert self.code(0) == self.code(1) == 0, self.tail()


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def final_state(workdir, position: int = TOTAL) -> dict:
    """The checkpoint at `position`, saved over two processes, restored on this one."""
    config = workdir_lib.load_config(os.path.join(workdir, "config.json"))
    manager = checkpoints.make_manager(str(workdir))
    try:
        template = parallel.state_template(config, parallel.make_mesh())
        state = checkpoints.restore(manager, template, position)
    finally:
        manager.close()
    return serialization.to_state_dict(jax.tree.map(np.asarray, state))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    flat_a, flat_b = dict(ocp.tree.to_flat_dict(a)), dict(ocp.tree.to_flat_dict(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), key


def train_args(workdir, benchmark, *more: str) -> list[str]:
    return [
        f"--workdir={workdir}",
        "--config.mode=train",
        "--config.method=metapix",
        f"--config.data.synthetic_root={benchmark}",
        *more,
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    os.makedirs(root / "logs")
    return root


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted two-process run (it also writes the benchmark: process 0 writes,
    process 1 waits at a barrier)."""
    run = Launch(root / "logs", "reference", *train_args(root / "reference", root / "benchmark"))
    return run.wait()


@pytest.fixture(scope="module")
def interrupted(root, reference):
    """(SIGTERM launch, the checkpoints it left, kill -9 launch, final launch) of one
    workdir, the same command each time."""
    workdir = root / "interrupted"
    args = train_args(workdir, root / "benchmark")
    logs = root / "logs"
    sigterm = Launch(logs, "sigterm", *args, faults={1: "sigterm:1"}).wait()
    saved = checkpoints.finished_positions(str(workdir))
    killed = Launch(logs, "killed", *args, faults={1: "position:9"}).wait()
    final = Launch(logs, "final", *args).wait()
    return sigterm, saved, killed, final


def test_a_whole_run_on_two_processes(reference, root):
    reference.succeeded()
    # Progress lines come from process 0 alone.
    assert "[metapix] weighted_gen2 2/2 @11" in reference.out(0)
    assert "[metapix]" not in reference.out(1), reference.out(1)[-2000:]
    # An evaluation at the end of every phase that changes the segmenter.
    evals = sorted(os.path.basename(p) for p in glob.glob(str(root / "reference/eval/eval_*")))
    assert evals == [f"eval_{p:08d}.json" for p in (3, 7, 11)]
    # The phase ends' checkpoints are kept (the periodic ones, 4 and 8, rolled away).
    assert checkpoints.finished_positions(str(root / "reference")) == [3, 5, 7, 9, 11]
    # One event file (process 0's), with images at every image_every: the target strip
    # always, the source strips where the U-Net's weights mean something (6 and 9).
    events = glob.glob(str(root / "reference/events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["tensors"]
    steps = {t: [e.step for e in accumulator.Tensors(t)] for t in tags if "/image_" in t}
    assert steps["target/image_label_prediction"] == [3, 6, 9]
    assert steps["source/image_label_weights_harmful"] == [6, 9]


def test_sigterm_to_one_process_stops_both_at_one_position(interrupted):
    sigterm, saved, _, _ = interrupted
    # Both end (the process that got the signal saving alone, the other stepping on, hung).
    assert sigterm.code(1) == 128 + signal.SIGTERM, sigterm.tail()
    assert sigterm.code(0) == 128 + signal.SIGTERM, sigterm.tail()
    assert "saving a checkpoint at the position all processes agree on" in sigterm.out(1)
    message = last_line(sigterm.err(1))
    position = int(message.split("interrupted at position ")[1].split(" ")[0])
    assert 1 <= position < TOTAL, message  # The signal comes after the step to 1.
    assert message.endswith("; checkpoint saved; run the same command to resume"), message
    assert message.startswith(f"interrupted at position {position} of {TOTAL} (phase ")
    other = last_line(sigterm.err(0))
    assert other.startswith(f"interrupted at position {position} of {TOTAL} (phase "), other
    assert "(process 1 got SIGTERM); checkpoint saved" in other, other
    assert "Traceback" not in sigterm.err(0) + sigterm.err(1)
    # Both saved that position together (one checkpoint, written by both processes).
    assert saved[-1] == position, saved


def test_kill_9_of_one_process_ends_the_other_at_once(interrupted):
    _, _, killed, _ = interrupted
    assert killed.code(1) == -signal.SIGKILL, killed.tail()
    assert killed.code(0) not in (0, None), killed.tail()
    # The survivor ends with one line, long before the heartbeat timeout (60 s).
    assert killed.ended[0] - killed.ended[1] < 30, killed.ended
    line = last_line(killed.err(0))
    assert line.startswith("DistributedError: process 0 of 2 stopped: "), killed.tail()
    assert "run the same command on every host to resume" in line
    assert "Traceback" not in killed.err(0)


def test_the_same_command_resumes_to_the_uninterrupted_params(interrupted, reference, root):
    _, _, _, final = interrupted
    final.succeeded()
    assert "continuing from position" in final.out(0)
    reference.succeeded()
    assert_bitwise_equal(final_state(root / "interrupted"), final_state(root / "reference"))
    # The comparison can fail: an earlier position's state differs from the final one.
    with pytest.raises(AssertionError):
        assert_bitwise_equal(final_state(root / "interrupted", 9), final_state(root / "reference"))


def test_a_process_that_stops_answering_ends_the_other_within_the_heartbeat(root, reference):
    """SIGSTOP: the frozen process keeps its connections open, so no collective fails; only
    the runtime's heartbeat (config.heartbeat_timeout) can end the other."""
    args = train_args(
        root / "stopped", root / "benchmark", f"--config.heartbeat_timeout={HEARTBEAT}"
    )
    run = Launch(root / "logs", "stopped", *args)
    try:
        deadline = time.monotonic() + WAIT
        while "joint 2/3" not in run.out(0) and time.monotonic() < deadline:
            assert run.processes[0].poll() is None, run.tail()
            time.sleep(0.2)
        run.processes[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        run.processes[0].wait(timeout=HEARTBEAT + 60)
        ended = time.monotonic()
    finally:
        for p in run.processes:
            p.kill()
            p.wait()
    assert run.code(0) != 0, run.tail()
    assert ended - stopped < HEARTBEAT + 30, (ended - stopped, run.tail())
    assert "another task died" in run.err(0) or "DistributedError" in run.err(0), run.tail()


@pytest.fixture(scope="module")
def compared(root, reference):
    """Compare mode on two processes: direct_joint, then MetaPix from its checkpoint at N1."""
    args = [
        f"--workdir={root / 'compare'}",
        "--config.mode=compare",
        "--config.compare_methods=('direct_joint', 'metapix')",
        f"--config.data.synthetic_root={root / 'benchmark'}",
    ]
    return Launch(root / "logs", "compare", *args).wait()


def test_compare_mode_on_two_processes(compared, root, tmp_path):
    compared.succeeded()
    assert "its first 3 steps are direct_joint's joint phase" in compared.out(0)
    assert "| metapix |" in compared.out(0) and "| metapix |" not in compared.out(1)
    results = json.loads((root / "compare" / "compare.json").read_text())
    separation = results["metapix"]["weights"]
    assert 0 <= separation["auroc"] <= 1 and separation["harmful_fraction"] > 0
    with Image.open(root / "compare" / "weights.png") as image:
        assert image.size[0] > 0
    # The gathered rows are the right ones: one process, all rows at hand, agrees.
    method_dir = str(tmp_path / "metapix")
    shutil.copytree(root / "compare" / "metapix", method_dir)
    config = workdir_lib.load_config(os.path.join(method_dir, "config.json"))
    alone = compare.weight_separation(config, method_dir)
    assert alone["images"] == separation["images"] == config.data.synthetic_num_source
    assert alone["harmful_fraction"] == separation["harmful_fraction"]  # The same pixels.
    for key in ("mean_weight_harmful", "mean_weight_clean"):  # Paired with their masks.
        assert alone[key] == pytest.approx(separation[key], rel=1e-5), key
    # One device runs the U-Net on batches of 4 rows, two on 2 rows each: the weights
    # differ in their last bits, and the AUROC ranks pixels whose weights nearly tie.
    assert alone["auroc"] == pytest.approx(separation["auroc"], abs=1e-3)


def test_eval_mode_on_two_processes(root, reference):
    reference.succeeded()
    trained = json.loads((root / "reference" / "eval" / "latest.json").read_text())
    run = Launch(root / "logs", "eval", f"--workdir={root / 'reference'}", "--config.mode=eval")
    run.wait().succeeded()
    again = json.loads((root / "reference" / "eval" / "latest.json").read_text())
    assert again["position"] == TOTAL
    assert again["labeled_pixels"] == trained["labeled_pixels"] > 0
    assert again["miou"] == pytest.approx(trained["miou"], abs=1e-7)
    assert f"eval at position {TOTAL}" in run.out(0) and "eval at" not in run.out(1)


@pytest.fixture(scope="module")
def images(root):
    """Five images of four sizes: with eval_batch 4, the second global batch holds one
    image, so process 1 has nothing of its own there (a padded share)."""
    folder = root / "images"
    rng = np.random.default_rng(0)
    sizes = {"a/one.png": (23, 41), "a/b/two.png": (16, 32), "three.png": (50, 30)}
    sizes.update({"four.png": (16, 32), "a/five.png": (33, 17)})
    for name, (h, w) in sizes.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder, sizes


def test_predict_mode_on_two_processes(root, reference, images, tmp_path):
    reference.succeeded()
    folder, sizes = images
    fields = [f"--config.predict.input={folder}", "--config.predict.weights_for=source"]
    fields += ["--config.predict.num_weight_images=3", "--config.predict.train_ids=True"]
    out = root / "predicted"
    run = Launch(
        root / "logs",
        "predict",
        f"--workdir={root / 'reference'}",
        "--config.mode=predict",
        f"--config.predict.output={out}",
        *fields,
    ).wait()
    run.succeeded()
    assert "predict: 5 images segmented" in run.out(0) and "predict:" not in run.out(1)
    # The same PNGs as one process writes, which holds every row itself.
    config = workdir_lib.load_config(str(root / "reference" / "config.json"))
    with config.unlocked():
        config.mode = "predict"
        config.predict.input, config.predict.output = str(folder), str(tmp_path / "alone")
        config.predict.weights_for, config.predict.num_weight_images = "source", 3
        config.predict.train_ids = True
    predict.run_prediction(config, str(root / "reference"))
    written = sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/**/*.png", recursive=True))
    alone = sorted(
        os.path.relpath(p, tmp_path / "alone")
        for p in glob.glob(f"{tmp_path / 'alone'}/**/*.png", recursive=True)
    )
    assert written == alone
    assert len([n for n in written if n.endswith("_trainIds.png")]) == len(sizes)
    assert len([n for n in written if n.endswith("_weights.png")]) == 3
    for name in written:
        with Image.open(out / name) as a, Image.open(tmp_path / "alone" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
    for name, (h, w) in sizes.items():
        with Image.open(out / (os.path.splitext(name)[0] + "_trainIds.png")) as image:
            assert image.size == (w, h), name
