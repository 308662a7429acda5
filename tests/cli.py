"""Runs main.py in a subprocess the way a user would, for the tests that need a process."""

import os
import subprocess
import sys

from metapix_jax.faults import KILL_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(
    *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`python main.py ARGS` from the repo root on the CPU; output captured as text.

    The child inherits this process's environment (conftest's compilation cache among
    it) without the fault hook, which only `env` may set.
    """
    child_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    child_env.pop(KILL_ENV, None)
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
