"""Runs main.py in a subprocess the way a user would, for the tests that need a process."""

import os
import subprocess
import sys

from metapix_jax.faults import KILL_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (conftest's compilation cache among it) on the CPU,
    without the fault hook, which only `env` may set."""
    child_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    child_env.pop(KILL_ENV, None)
    child_env.update(env or {})
    return child_env


def run_main(
    *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`python main.py ARGS` from the repo root on the CPU; output captured as text."""
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        env=main_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_main(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python main.py ARGS` started in the background (as run_main; `communicate()` it)."""
    return subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        env=main_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
