"""The command line a new user meets: every expected failure is one line and status 1, the
config fields are listed with their meaning, and a trained run's config is its own."""

import json

import pytest
from cli import run_main

from configs import default
from configs import test as test_config
from metapix_jax import cli
from metapix_jax import workdir as workdir_lib

# (arguments after main.py, the start of the one line expected on stderr)
ERRORS = [
    (
        ["--config=configs/test.py", "--config.schedule.joint_step=5"],
        "ConfigError: --config.schedule.joint_step=5: config.schedule has no field "
        "'joint_step'; the closest: joint_steps",
    ),
    (
        ["--config=configs/test.py", "--config.schedul.joint_steps=5"],
        "ConfigError: --config.schedul.joint_steps=5: the config has no field 'schedul'; "
        "the closest: schedule",
    ),
    (["--config=configs/demoo.py"], "ConfigError: --config=configs/demoo.py: no such file"),
    (
        ["--config=configs/test.py", "--config.model.width=abc"],
        "ConfigError: flag --config.model.width=abc",
    ),
    (["--config=configs/test.py", "surplus"], "unexpected arguments: surplus"),
    (
        ["--config=configs/test.py", "--config.mode=results"],
        "ConfigError: config.mode='results': no finished run under",
    ),
    (
        ["--config=configs/test.py", "--config.mode=eval"],
        "ConfigError: config.mode='eval': no checkpoint in",
    ),
    (
        ["--config=configs/test.py", "--config.model.split_block=9"],
        "ConfigError: config.model.split_block=9 must be an integer in 0..5",
    ),
]


@pytest.mark.parametrize("args,expected", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_every_expected_failure_is_one_line_and_status_1(args, expected, tmp_path):
    proc = run_main(*args, f"--workdir={tmp_path}", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(expected), lines[0]


def test_list_fields_names_every_field_with_its_default_and_meaning():
    proc = run_main("--list_fields", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {line.split(" = ")[0]: line for line in proc.stdout.splitlines() if " = " in line}
    config = default.get_config()
    fields = workdir_lib.flatten(json.loads(config.to_json_best_effort()))
    assert set(listed) == set(fields)
    assert listed["data.height"] == (
        "data.height = 512  # Every image is resized to height x width (paper: 1024x512)."
    )
    # A field whose comment stands on the lines above it.
    assert listed["data.eval_protocol"].startswith("data.eval_protocol = 'full'  # 'full': ")


def test_a_run_dir_or_its_config_json_is_a_config(tmp_path):
    config = test_config.get_config()
    config.model.width = 0.125
    workdir_lib.save_config(config, str(tmp_path))
    for given in (str(tmp_path), str(tmp_path / "config.json")):
        (arg,) = cli.saved_config_argument([f"--config={given}"])
        assert arg == f"--config={cli.SAVED_CONFIG}:{given}"
        from configs import saved

        loaded = saved.get_config(given)
        assert loaded.model.width == 0.125 and loaded.compare_methods == config.compare_methods
        assert loaded.to_json_best_effort() == config.to_json_best_effort()
    assert cli.saved_config_argument(["--config=configs/test.py"]) == ["--config=configs/test.py"]


def test_eval_reads_the_runs_own_config_except_the_commands_fields(tmp_path):
    trained = test_config.get_config()
    trained.mode = "train"
    trained.data.synthetic_root = "/where/the/run/trained"
    trained.data.height = 24
    workdir_lib.save_config(trained, str(tmp_path))
    command = test_config.get_config()  # Another size, another benchmark root.
    command.mode = "eval"
    command.eval_checkpoint = 3
    command.data.eval_batch = 8
    chosen = cli.config_for_mode(command, str(tmp_path), overridden={"data.eval_batch"})
    assert chosen.mode == "eval" and chosen.eval_checkpoint == 3
    assert chosen.data.synthetic_root == "/where/the/run/trained" and chosen.data.height == 24
    assert chosen.data.eval_batch == 8  # Set on the command line: the command's.
    command.mode = "train"  # Training checks config.json itself (workdir.check_config_unchanged).
    assert cli.config_for_mode(command, str(tmp_path), set()) is command


def test_overridden_fields_are_read_from_the_command_line():
    argv = ["main.py", "--config=x.py", "--config.data.height=8", "--config.seed", "3", "-v=1"]
    assert cli.overridden_fields(argv) == {"data.height", "seed"}


def test_progress_lines_fit_100_columns_even_at_the_papers_scale():
    from metapix_jax import progress, schedule

    phase = schedule.Phase("weighted", 3, 180_000, 15_000)
    summary = {"loss": 0.123456789, "weight_mean": 0.654321, "grad_norm": 12.3, "nonfinite": 3}
    line = progress.progress_line(phase, 195_000, summary, 12.345, "12:34:56")
    expected = "weighted_gen3 15000/15000 @195000 loss 0.1235 w 0.6543 skip 3 12.3/s ETA 12:34:56"
    assert line == expected
    assert len(f"[metapix_online] {line}") <= progress.LINE_WIDTH
