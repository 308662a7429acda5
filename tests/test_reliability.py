"""Reliability at the edges: the file system, two runs on one workdir, signals at start-up,
kills during a phase-end evaluation, damaged and silently corrupted checkpoints.

The main.py runs share one story on the tiny direct_joint schedule (joint 3, joint_gen1 2:
5 positions, a checkpoint at every one, an evaluation at both phase ends): a run killed
in the middle of the evaluation at position 3 leaves its lock note behind; the rerun
takes the lock over, is paused while a second run on the same workdir is refused, then
redoes that evaluation and completes. The finished workdir is then copied for the
readers (eval, predict on a damaged newest checkpoint), a signal during a restore and a
disk that fills during a save.

Read-only and full file systems are real tmpfs mounts where this process may mount them
(root with CAP_SYS_ADMIN, as in CI); elsewhere the read-only case uses permission bits
(which a non-root user cannot write through) and, as root without mounts, an injected
EROFS in-process: each test says which it used.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import ROOT, run_main, start_main

from configs import test as test_config
from metapix_jax import (
    checkpoints,
    cli,
    evaluate,
    filesystem,
    parallel,
    preemption,
    workdir_lock,
)
from metapix_jax import state as state_lib
from metapix_jax.faults import KILL_ENV

TOTAL = 5
TRAIN = (
    "--config=configs/test.py",
    "--config.mode=train",
    "--config.method=direct_joint",
    "--config.schedule.generations=1",
    "--config.checkpoint_every=1",
    "--config.eval_at_phase_end=True",
)


def train(workdir: str, data: str, env: dict | None = None, *args: str):
    return run_main(*TRAIN, f"--workdir={workdir}", data, *args, env=env)


def last_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- file systems: mounts where allowed -----------------------------------------------------


def mount_tmpfs(path: str, size_bytes: int, read_only: bool = False) -> bool:
    """Mounts a tmpfs of that size at `path`; False where this process may not mount."""
    os.makedirs(path, exist_ok=True)
    options = f"size={max(size_bytes // 1024, 16)}k" + (",ro" if read_only else "")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True
    )
    return proc.returncode == 0


@pytest.fixture
def mounts():
    """mount(path, size, read_only) -> bool; everything mounted is unmounted afterwards."""
    mounted = []

    def mount(path: str, size: int, read_only: bool = False) -> bool:
        ok = mount_tmpfs(path, size, read_only)
        if ok:
            mounted.append(path)
        return ok

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], capture_output=True)


def read_only_dir(path: str, mount) -> str | None:
    """A directory this process cannot write to: 'tmpfs' (a read-only mount), 'chmod'
    (permission bits, for a non-root user), or None (root without mounts)."""
    if mount(path, 64 * 1024, read_only=True):
        return "tmpfs"
    if os.geteuid() != 0:
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o555)
        return "chmod"
    return None


# ---- in-process: messages, the early check, the lock, the signals ---------------------------


def test_describe_names_the_path_the_problem_and_what_to_do(tmp_path):
    workdir = str(tmp_path / "run")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (OSError(errno.EROFS, "Read-only file system", workdir), "cannot write to the workdir"),
        (PermissionError(errno.EACCES, "Permission denied", f"{workdir}/x"), "permission denied"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", f"{a_file}/run"), "is a file"),
        (FileExistsError(errno.EEXIST, "File exists", str(a_file)), "is a file, not a directory"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", workdir), "it is a directory"),
        (OSError(errno.ENOSPC, "No space left on device", f"{workdir}/c"), "no space left on"),
        # TensorStore's ValueError (Orbax's writer) carries the system's text only.
        (
            ValueError(
                f'RESOURCE_EXHAUSTED: Error writing local file "{workdir}/x": Failed to write '
                "5270 bytes to file 19: No space left on device [os_error_code='28']"
            ),
            f"no space left on {workdir}; free space and run the same command to resume",
        ),
    ]
    for error, expected in cases:
        message = filesystem.describe(error, workdir)
        assert expected in message, (error, message)
        assert "\n" not in message
        named = [str(a_file), workdir]
        assert any(path in message for path in named), message


def test_check_writable_refuses_a_file_a_path_under_a_file_and_a_read_only_dir(
    tmp_path, mounts, monkeypatch
):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for path, errno_expected, words in [
        (str(a_file), errno.EEXIST, f"the workdir {a_file} is a file, not a directory"),
        (str(a_file / "run"), errno.ENOTDIR, f"{a_file} is a file, not a directory"),
    ]:
        with pytest.raises(OSError) as error:
            filesystem.check_writable(path)
        assert error.value.errno == errno_expected
        assert words in filesystem.describe(error.value, path)
    read_only = str(tmp_path / "read_only")
    how = read_only_dir(read_only, mounts)
    if how is None:  # Root ignores permission bits and may not mount here: inject EROFS.

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

        monkeypatch.setattr(filesystem.tempfile, "mkstemp", refuse)
    for path in (read_only, os.path.join(read_only, "sub")):
        with pytest.raises(OSError) as error:
            filesystem.check_writable(path)
        message = filesystem.describe(error.value, path)
        expected = "read-only file system" if how != "chmod" else "permission denied"
        assert f"cannot write to the workdir {read_only}" in message or (
            f"cannot write to {read_only}" in message
        ), (how, message)
        assert expected in message, (how, message)
    filesystem.check_writable(str(tmp_path / "fine" / "new"))  # Created, written, cleaned.
    assert os.listdir(tmp_path / "fine" / "new") == []


def test_cli_turns_errors_of_the_file_system_into_one_line(tmp_path, monkeypatch, capsys):
    """The one place (cli.run): OSError and TensorStore's wording of a full disk."""
    config = test_config.get_config()
    config.mode = "train"
    workdir = str(tmp_path / "run")
    for raised, expected in [
        (
            ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']"),
            f"OSError: no space left on {workdir}; free space and run the same command to resume",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", f"{workdir}/checkpoints"),
            f"OSError: cannot write to {workdir}/checkpoints (read-only file system)",
        ),
    ]:

        def dispatch(config, workdir, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "dispatch", dispatch)
        with pytest.raises(SystemExit) as exit_:
            cli.run(config, workdir)
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert err.strip().startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(os.path.join(workdir, workdir_lock.OWNER_FILE))  # Released.


def test_a_second_holder_is_refused_with_the_first_ones_pid_host_and_start(tmp_path):
    workdir = str(tmp_path)
    with workdir_lock.hold(workdir):
        owner = workdir_lock.read_owner(workdir)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(workdir_lock.WorkdirInUseError) as error:
            with workdir_lock.hold(workdir):
                pass
        message = str(error.value)
        assert message.startswith(
            f"{workdir} is in use by process {os.getpid()} on {socket.gethostname()} "
            f"(started {owner['started']})"
        )
        with workdir_lock.hold(workdir, holder=False):  # Processes > 0 take no lock.
            pass
    assert workdir_lock.read_owner(workdir) is None  # Released: the note is gone.
    with workdir_lock.hold(workdir):  # And it can be taken again.
        pass


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    workdir = str(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not alive(gone.pid)
    open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w").close()
    with open(os.path.join(workdir, workdir_lock.OWNER_FILE), "w") as f:
        json.dump({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}, f)
    with workdir_lock.hold(workdir):
        assert workdir_lock.read_owner(workdir)["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert (
        f"warning: taking over the lock of {workdir} from process {gone.pid} on "
        f"{socket.gethostname()} (started then), which ended without releasing it"
    ) in out


SIGNAL_SCRIPT = """
import os, signal, sys, time
from metapix_jax import preemption
flag = preemption.InterruptFlag(at_once=True)
with flag:
    flag.cleanups.append(lambda: open(sys.argv[1], "w").close())
    if sys.argv[2] == "boundaries":
        with flag.at_step_boundaries():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("flag", flag.signum, flush=True)  # Inside: only the flag is set.
        print("not reached: leaving the loop with the flag set stops", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("where", ["start-up", "boundaries"])
def test_a_signal_outside_the_steps_stops_at_once_with_the_line_and_status(tmp_path, where):
    cleaned = tmp_path / "cleaned"
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(cleaned), where],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    signum = signal.SIGTERM if where == "boundaries" else signal.SIGINT
    assert proc.returncode == 128 + signum, proc.stderr
    assert proc.stderr.strip() == preemption.AT_ONCE_MESSAGE.format(name=signum.name)
    assert "not reached" not in proc.stdout and "Traceback" not in proc.stderr
    assert cleaned.exists()  # The cleanups ran (the lock's note is removed this way).
    if where == "boundaries":
        assert f"flag {int(signal.SIGTERM)}" in proc.stdout


# ---- checkpoint integrity ---------------------------------------------------------------------


def toy_state(position: int) -> state_lib.TrainState:
    """A small state; its 'w' is random bits, which Orbax's zstd stores verbatim (it cannot
    compress them), so that a test can find and flip a bit of exactly that array."""
    rng = np.random.default_rng(position)
    return state_lib.TrainState(
        params={"w": rng.integers(0, 2**32, (64, 64), dtype=np.uint32)},
        opt_state={"m": np.zeros(8, np.float32)},
        unet_params={"u": rng.standard_normal(16).astype(np.float32)},
        unet_opt_state={"v": np.zeros(4, np.float32)},
        rng=np.zeros(2, np.uint32),
        step=np.asarray(position, np.int32),  # 0-d arrays: Orbax restores no numpy scalar.
        position=np.asarray(position, np.int32),
    )


def flip_a_bit_of(workdir: str, position: int, array: np.ndarray) -> str:
    """Flips one bit in the middle of `array`'s bytes where the checkpoint's data files hold
    them; returns the file. Fails if they are not stored verbatim (the test would not hit
    the array)."""
    needle = array.tobytes()
    folder = os.path.join(checkpoints.checkpoint_dir(workdir), str(position))
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            data = bytearray(open(path, "rb").read())
            at = data.find(needle)
            if at >= 0:
                data[at + len(needle) // 2] ^= 0x10
                with open(path, "wb") as f:
                    f.write(bytes(data))
                return path
    raise AssertionError("the array's bytes are in no data file")


def test_a_flipped_bit_is_found_and_the_previous_checkpoint_used(tmp_path, capsys):
    readers, trainer = str(tmp_path / "readers"), str(tmp_path / "trainer")
    for workdir in (readers, trainer):
        manager = checkpoints.make_manager(workdir)
        for position in (1, 2):
            checkpoints.save(manager, toy_state(position))
        manager.close()
        flip_a_bit_of(workdir, 2, toy_state(2).params["w"])
    template = toy_state(0)
    manager = checkpoints.make_manager(readers)
    with pytest.raises(checkpoints.ChecksumMismatchError, match=r"\.params\['w'\] does not"):
        checkpoints.restore(manager, template, 2)  # Orbax itself reads it back without error.
    state = checkpoints.restore_latest_readable(manager, template, move_unreadable=False)
    manager.close()
    assert int(state.position) == 1
    np.testing.assert_array_equal(state.params["w"], toy_state(1).params["w"])
    out = capsys.readouterr().out
    assert (
        f"warning: checkpoint 2 in {checkpoints.checkpoint_dir(readers)} is unreadable "
        "(ChecksumMismatchError: .params['w'] does not match the checksum written with it"
    ) in out
    assert "skipped and left in place" in out
    assert checkpoints.finished_positions(readers) == [1, 2]  # A reader moves nothing.
    manager = checkpoints.make_manager(trainer)
    state = checkpoints.restore_latest_readable(manager, template)  # Training's restore.
    manager.close()
    assert int(state.position) == 1 and checkpoints.finished_positions(trainer) == [1]
    assert os.path.isdir(os.path.join(trainer, "unreadable_checkpoints", "2"))
    assert f"moved to {os.path.join(trainer, 'unreadable_checkpoints', '2')}" in (
        capsys.readouterr().out
    )


def test_a_checkpoint_from_before_the_checksums_restores_unverified(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path))
    manager.save(3, args=ocp.args.StandardSave(toy_state(3)), force=True)  # No checksums.
    manager.wait_until_finished()
    assert checkpoints.saved_checksums(str(manager.directory), 3) is None
    state = checkpoints.restore(manager, toy_state(0), 3)
    manager.close()
    assert int(state.position) == 3


# ---- main.py: a kill during an evaluation, two runs, a stale lock -----------------------------


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Killed during the evaluation at 3; rerun (taking the stale lock over) while a second
    run is refused; completed. Returns what each step left."""
    base = tmp_path_factory.mktemp("reliability")
    data = f"--config.data.synthetic_root={base / 'benchmark'}"
    workdir = str(base / "run")
    killed = train(workdir, data, {KILL_ENV: "eval:3"})
    after_kill = {
        "positions": checkpoints.finished_positions(workdir),
        "evaluated": os.path.exists(evaluate.result_path(workdir, 3)),
        "owner": workdir_lock.read_owner(workdir),
    }
    first = start_main(*TRAIN, f"--workdir={workdir}", data)
    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline:
        owner = workdir_lock.read_owner(workdir)
        if owner and owner["pid"] == first.pid:
            break
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGSTOP)  # Holding the lock, paused: the second run comes now.
    try:
        second = train(workdir, data)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=900)
    return {
        "base": base,
        "data": data,
        "workdir": workdir,
        "killed": killed,
        "after_kill": after_kill,
        "first": subprocess.CompletedProcess(first.args, first.returncode, out, err),
        "first_pid": first.pid,
        "second": second,
    }


def test_a_kill_during_a_phase_end_evaluation_is_redone_on_resume(story):
    killed, after, first = story["killed"], story["after_kill"], story["first"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert after["positions"][-1] == 3 and not after["evaluated"]
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "continuing from position 3 of 5" in first.stdout
    assert "eval at position 3:" in first.stdout  # Redone before joint_gen1 starts.
    assert first.stdout.index("eval at position 3:") < first.stdout.index("joint_gen1 1/2")
    redone = json.load(open(evaluate.result_path(story["workdir"], 3)))
    # Deterministic: the same number as an evaluation of checkpoint 3 by eval mode.
    copy = str(story["base"] / "eval3")
    shutil.copytree(story["workdir"], copy)
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={copy}",
        "--config.mode=eval",
        "--config.eval_checkpoint=3",
        story["data"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.load(open(evaluate.result_path(copy, 3)))
    assert again["miou"] == redone["miou"] and again["per_class_iou"] == redone["per_class_iou"]
    assert os.path.exists(evaluate.result_path(story["workdir"], TOTAL))


def test_a_second_run_on_a_workdir_in_use_ends_at_once_naming_the_first(story):
    second, first = story["second"], story["first"]
    assert second.returncode == 1, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert last_line(second).startswith(
        f"WorkdirInUseError: {story['workdir']} is in use by process {story['first_pid']} on "
        f"{socket.gethostname()} (started "
    )
    assert "compiling" not in second.stdout  # Refused before anything slow.
    assert first.returncode == 0  # The first one was not disturbed.


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(story):
    owner = story["after_kill"]["owner"]
    assert owner and not alive(owner["pid"])  # kill -9 left its note behind.
    assert (
        f"warning: taking over the lock of {story['workdir']} from process {owner['pid']} on "
        f"{owner['host']} (started {owner['started']}), which ended without releasing it"
    ) in story["first"].stdout
    assert workdir_lock.read_owner(story["workdir"]) is None  # Released at the end.


# ---- main.py: readers of a damaged newest checkpoint, a missing one, signals at start-up ----


def damage(workdir: str, position: int) -> None:
    """Overwrites the data files of a finished checkpoint (test_resume.damage's way)."""
    folder = os.path.join(checkpoints.checkpoint_dir(workdir), str(position))
    for parent, _, names in os.walk(folder):
        for name in names:
            if name != checkpoints.STEP_METADATA:
                with open(os.path.join(parent, name), "wb") as f:
                    f.write(b"\0garbage")


def test_eval_and_predict_skip_a_damaged_newest_checkpoint_and_leave_it(story, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(story["workdir"], workdir)
    damage(workdir, TOTAL)
    before = checkpoints.finished_positions(workdir)
    image = sorted(
        os.path.join(parent, name)
        for parent, _, names in os.walk(story["base"] / "benchmark" / "cityscapes")
        for name in names
        if name.endswith("leftImg8bit.png")
    )[0]
    output = str(tmp_path / "predicted")
    for mode, extra in [("eval", []), ("predict", [f"--config.predict.input={image}"])]:
        proc = run_main(
            "--config=configs/test.py",
            f"--workdir={workdir}",
            f"--config.mode={mode}",
            f"--config.predict.output={output}",
            story["data"],
            *extra,
        )
        assert proc.returncode == 0, (mode, proc.stdout[-2000:], proc.stderr[-3000:])
        assert (
            f"warning: checkpoint {TOTAL} in {checkpoints.checkpoint_dir(workdir)} is unreadable ("
        ) in proc.stdout
        assert "skipped and left in place" in proc.stdout
        assert checkpoints.finished_positions(workdir) == before  # Nothing moved.
        assert not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))
    assert json.load(open(os.path.join(workdir, "eval", "latest.json")))["position"] == TOTAL - 1
    assert any(name.endswith("_color.png") for _, _, names in os.walk(output) for name in names)


def test_an_eval_checkpoint_that_does_not_exist_lists_the_ones_that_do(story):
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={story['workdir']}",
        "--config.mode=eval",
        "--config.eval_checkpoint=999",
        story["data"],
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    positions = ", ".join(map(str, checkpoints.finished_positions(story["workdir"])))
    assert proc.stderr.strip() == (
        "ConfigError: config.eval_checkpoint=999: no checkpoint at that position in "
        f"{checkpoints.checkpoint_dir(story['workdir'])}; the positions there: {positions} "
        "(-1 = the latest)"
    )


@pytest.mark.parametrize(
    "mode,fault",
    [("train", "sigint:restore"), ("eval", "sigterm:restore"), ("new", "sigterm:initialise")],
)
def test_a_signal_during_start_up_ends_with_the_line_and_status(story, tmp_path, mode, fault):
    workdir = str(tmp_path / "run")
    if mode != "new":
        shutil.copytree(story["workdir"], workdir)
    before = checkpoints.finished_positions(workdir)
    args = TRAIN if mode != "eval" else ("--config=configs/test.py", "--config.mode=eval")
    proc = run_main(*args, f"--workdir={workdir}", story["data"], env={KILL_ENV: fault})
    signum = signal.SIGINT if fault.startswith("sigint") else signal.SIGTERM
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert last_line(proc) == preemption.AT_ONCE_MESSAGE.format(name=signum.name)
    assert checkpoints.finished_positions(workdir) == before
    assert workdir_lock.read_owner(workdir) is None  # The lock's note went with it.


# ---- main.py: the file system ------------------------------------------------------------------


def test_a_workdir_that_is_a_file_or_under_one_is_one_line(story, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for workdir, expected in [
        (a_file, f"OSError: the workdir {a_file} is a file, not a directory"),
        (a_file / "run", f"OSError: cannot create {a_file}/run: {a_file} is a file"),
    ]:
        proc = train(str(workdir), story["data"])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().startswith(expected), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_read_only_workdir_is_one_line(story, tmp_path, mounts):
    read_only = str(tmp_path / "read_only")
    how = read_only_dir(read_only, mounts)
    if how is None:
        pytest.skip(
            "root without mounts: permission bits do not stop root and no read-only mount "
            "can be made (test_check_writable_... covers it with an injected EROFS)"
        )
    problem = "read-only file system" if how == "tmpfs" else "permission denied"
    for workdir in (read_only, os.path.join(read_only, "run")):
        proc = train(workdir, story["data"])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().startswith("OSError: cannot write to"), proc.stderr
        assert f"{read_only}" in proc.stderr and f"({problem})" in proc.stderr


def checkpoint_bytes(workdir: str, position: int) -> int:
    folder = os.path.join(checkpoints.checkpoint_dir(workdir), str(position))
    return sum(
        os.path.getsize(os.path.join(parent, name))
        for parent, _, names in os.walk(folder)
        for name in names
    )


def test_a_disk_that_fills_during_a_save_is_one_line_and_resumes(story, tmp_path, mounts):
    """A real full disk: a tmpfs that holds two checkpoints, not three."""
    size = checkpoint_bytes(story["workdir"], TOTAL)
    disk = str(tmp_path / "disk")
    if not mounts(disk, int(2.4 * size)):
        pytest.skip(
            "this process may not mount a tmpfs; the full-disk message is covered in-process by "
            "test_describe_names_the_path_... and test_cli_turns_errors_of_the_file_system_..."
        )
    workdir = os.path.join(disk, "run")
    proc = train(workdir, story["data"], None, "--config.eval_at_phase_end=False")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"OSError: no space left on {workdir}; free space and run the same command to resume"
    ), proc.stderr
    last = checkpoints.finished_positions(workdir)[-1]
    assert 1 <= last < TOTAL  # Where it fills depends on the other files (events, config).
    # The last good checkpoint reads back, checksums verified.
    config = test_config.get_config()
    config.method, config.schedule.generations = "direct_joint", 1
    manager = checkpoints.make_manager(workdir)
    template = parallel.state_template(config, parallel.make_mesh())
    assert int(checkpoints.restore(manager, template, last).position) == last
    manager.close()
    # Space freed: the same command resumes from it and completes.
    subprocess.run(["mount", "-o", f"remount,size={20 * size // 1024}k", disk], check=True)
    proc = train(workdir, story["data"], None, "--config.eval_at_phase_end=False")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"continuing from position {last} of {TOTAL}" in proc.stdout
    assert checkpoints.finished_positions(workdir)[-1] == TOTAL
