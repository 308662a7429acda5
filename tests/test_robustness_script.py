"""benchmarks/robustness.sh, the command behind the README's robustness table, planned dry.

Running it takes hours, so the test checks its plan (DRY_RUN=1): one compare workdir per
kind of harm and seed, the right methods in each, every config field it sets a real one,
every method a real one, and results mode last over the same root.
"""

import os
import shlex
import subprocess

from metapix_jax import methods, validation
from metapix_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("confusion", "spatial4", "noise", "appearance", "none")


def planned_commands(tmp_path, **env: str) -> list[list[str]]:
    """The commands a dry run prints, split as the shell would."""
    out = subprocess.run(
        ["bash", "benchmarks/robustness.sh", str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1", PYTHON="python3", **env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert not list(tmp_path.iterdir()), "a dry run must not create anything"
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--"))


def test_one_compare_per_kind_and_seed_then_results(tmp_path):
    commands = planned_commands(tmp_path, SEEDS="0 2")
    *compares, results = commands
    assert flags(results) == {
        "config": "configs/demo.py",
        "workdir": str(tmp_path),
        "config.mode": "results",
    }
    workdirs = [flags(c)["workdir"] for c in compares]
    assert workdirs == [f"{tmp_path}/{k}/seed_{s}" for s in (0, 2) for k in KINDS]
    for command in compares:
        f = flags(command)
        kind, seed = f["workdir"].split("/")[-2:]
        assert f["config.mode"] == "compare"
        assert f["config.seed"] == seed.removeprefix("seed_")
        harm = f["config.data.synthetic_harm"]
        assert harm in synthetic.HARM_KINDS
        assert harm == kind.removesuffix("4")
        if kind == "spatial4":
            assert f["config.data.synthetic_spatial_px"] == "4"
            assert f["config.data.synthetic_spatial_rate"] == "0.5"


def test_methods_per_workdir(tmp_path):
    for command in planned_commands(tmp_path, SEEDS="1")[:-1]:
        f = flags(command)
        kind = f["workdir"].split("/")[-2]
        names = [n.strip("'") for n in f["config.compare_methods"].strip("(),").split(",")]
        for name in names:
            methods.resolve(name)  # A misspelt method raises.
        assert names[0] == ("target_only" if kind == "confusion" else "direct_joint")
        assert "direct_joint" in names and "metapix" in names and "metapix_w19" in names
        assert ("oracle_mask" in names) == (kind != "none"), kind
        assert ("target_only" in names) == (kind == "confusion"), kind


def test_every_field_it_sets_exists(tmp_path):
    known = validation.default_values()
    for command in planned_commands(tmp_path):
        for field in flags(command):
            if field.startswith("config."):
                assert field.removeprefix("config.") in known, field


def test_narrowed_by_environment(tmp_path):
    commands = planned_commands(
        tmp_path, SEEDS="3", KINDS="none noise", METHODS="direct_joint oracle_mask metapix"
    )
    compare_methods = [flags(c)["config.compare_methods"] for c in commands[:-1]]
    assert compare_methods == [
        "('direct_joint','metapix',)",  # no oracle on the control
        "('direct_joint','oracle_mask','metapix',)",
    ]
