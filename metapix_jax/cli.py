"""What main.py does with the command line: parse it, turn every expected failure into one
line, pick the config a mode should use, and dispatch.

Kept out of main.py so that main.py stays a list of flags, and so that the tests can call
each piece. Heavy modules (JAX, the training code) are imported only when a mode runs, so
that `--help`, `--list_fields` and flag errors answer in a second.
"""

import ast
import difflib
import errno
import io
import json
import os
import re
import sys
import tokenize
from typing import NoReturn

import ml_collections
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")
SAVED_CONFIG = os.path.join(ROOT, "configs", "saved.py")
# Fields that belong to what a command does, not to the run it reads: eval and predict take
# them from the command, everything else from the run's own config.json.
COMMAND_FIELDS = ("mode", "eval_checkpoint", "distributed", "coordinator_address")
COMMAND_FIELDS += ("num_processes", "process_id", "heartbeat_timeout")
COMMAND_PREFIXES = ("predict.",)


def fail(message: str, exit_code: int = 1) -> NoReturn:
    """Ends with the message on stderr (one line per problem) and a non-zero status."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(exit_code)


def verbosity_given(argv: list[str]) -> bool:
    """Whether the user chose a log verbosity (absl marks it as set even when not)."""
    return any(a.split("=")[0] in ("-v", "--v", "--verbosity", "-verbosity") for a in argv)


# ---- flags ---------------------------------------------------------------------------------


def saved_config_argument(argv: list[str]) -> list[str]:
    """--config=<a run's workdir or config.json> -> configs/saved.py, which loads that JSON."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name == "--config" and eq and (os.path.isdir(value) or value.endswith(".json")):
            arg = f"--config={SAVED_CONFIG}:{value}"
        out.append(arg)
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line instead of a traceback."""
    argv = saved_config_argument(argv)
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS.config is not None:  # A file that failed to load raises when read.
            flags.FLAGS.config.get("mode")
        return rest
    except Exception as error:  # noqa: BLE001 - absl and config_flags raise many kinds.
        fail(f"ConfigError: {flag_error_message(argv, error)}")


def config_path(argv: list[str]) -> str | None:
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--config":
            return value
    return None


def flag_error_message(argv: list[str], error: Exception) -> str:
    """One line for a flag error: a misspelt field or group, a missing config file, ..."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    misspelt = re.search(r'Did you mean "[^"]+" instead of "([^"]+)"', text)
    if misspelt:
        return misspelt_field_message(argv, misspelt.group(1))
    path = config_path(argv)
    if "No such file" in text or "Errno 2" in text:
        shown = (path or "").split(":")[0]
        folder = os.path.dirname(DEFAULT_CONFIG)
        hidden = ("__init__.py", "saved.py")
        choices = ", ".join(
            sorted(f for f in os.listdir(folder) if f.endswith(".py") and f not in hidden)
        )
        return f"--config={shown}: no such file (the configs in configs/: {choices})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return first


def misspelt_field_message(argv: list[str], wrong: str) -> str:
    """'--config.a.b=v: config.a has no field 'b'; the closest are ...' for a typo."""
    for arg in argv:
        name, _, value = arg.partition("=")
        parts = name.removeprefix("--config.").split(".")
        if not name.startswith("--config.") or wrong not in parts:
            continue
        group = ".".join(parts[: parts.index(wrong)])
        names = field_names(group)
        closest = difflib.get_close_matches(wrong, names, n=3, cutoff=0.5)
        where = f"config.{group}" if group else "the config"
        hint = f"; the closest: {', '.join(closest)}" if closest else ""
        return f"{name}={value}: {where} has no field {wrong!r}{hint} (--list_fields lists all)"
    return f"no config field {wrong!r} (--list_fields lists all)"


def field_names(group: str) -> list[str]:
    """The fields (and groups) of one group of configs/default.py ('' = the top level)."""
    config = default_config()
    for part in filter(None, group.split(".")):
        config = config[part] if part in config else ml_collections.ConfigDict()
    return sorted(config.keys())


def default_config() -> ml_collections.ConfigDict:
    sys.path.insert(0, ROOT)
    from configs import default

    return default.get_config()


def overridden_fields(argv: list[str]) -> set[str]:
    """The config fields a command line sets (--config.a.b=v or --config.a.b v)."""
    return {
        arg.split("=")[0].removeprefix("--config.") for arg in argv if arg.startswith("--config.")
    }


# ---- --list_fields ---------------------------------------------------------------------------


def _comments_by_line(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line number, and the lines that hold nothing but a comment."""
    comments, alone = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if token.line.strip().startswith("#"):
                alone.add(token.start[0])
    return comments, alone


def _field_of(target: ast.expr, aliases: dict[str, str]) -> str | None:
    """'data.height' for `data.height = ...` where `config.data = data = ...`."""
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        prefix = aliases.get(target.value.id)
        return None if prefix is None else prefix + target.attr
    return None


def field_list(path: str = DEFAULT_CONFIG) -> str:
    """Every field of configs/default.py with its default value and its comment."""
    source = open(path).read()
    comments, alone = _comments_by_line(source)
    values = default_config()
    aliases, lines = {"config": ""}, []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        fields = [_field_of(t, aliases) for t in node.targets]
        if isinstance(node.value, ast.Call) and any(fields):  # config.data = data = ConfigDict()
            for t in node.targets:
                if isinstance(t, ast.Name):
                    aliases[t.id] = f"{fields[0]}."
            continue
        if not fields or fields[0] is None:
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in alone and not comments[n].startswith("----"):
            above.insert(0, comments[n])
            n -= 1
        meaning = " ".join(own or above)
        value = values
        for part in fields[0].split("."):
            value = value[part]
        lines.append(f"{fields[0]} = {value!r}" + (f"  # {meaning}" if meaning else ""))
    return "\n".join(lines)


# ---- which config a mode uses ----------------------------------------------------------------


def config_for_mode(
    config: ml_collections.ConfigDict, workdir: str, overridden: set[str]
) -> ml_collections.ConfigDict:
    """Eval and predict read a trained run: its own config.json, except the fields of the
    command (mode, eval_checkpoint, predict.*, process layout) and those set on the command
    line. So a demo method's eval reads the benchmark it was trained on, at its own size."""
    recorded_path = os.path.join(workdir, "config.json")
    if config.mode not in ("eval", "predict") or not os.path.isfile(recorded_path):
        return config
    from metapix_jax import workdir as workdir_lib

    try:
        recorded = workdir_lib.load_config(recorded_path)
    except (OSError, ValueError) as e:
        fail(f"ConfigError: {recorded_path}: cannot read the run's config ({e})")
    current = json.loads(config.to_json_best_effort())
    with recorded.unlocked():
        for field in workdir_lib.flatten(current):
            if field in overridden or field in COMMAND_FIELDS or field.startswith(COMMAND_PREFIXES):
                group, _, name = field.rpartition(".")
                target = recorded
                for part in filter(None, group.split(".")):
                    target = target[part]
                source = config
                for part in filter(None, group.split(".")):
                    source = source[part]
                target[name] = source[name]
    print(f"[{config.mode}] with the run's own config ({recorded_path})", flush=True)
    return recorded


# ---- running a mode --------------------------------------------------------------------------


# Modes that hold the workdir lock (workdir_lock.py says why the others do not).
LOCKING_MODES = ("train", "compare")


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where a mode writes: predict.output for predict mode if set, else the workdir."""
    if config.mode == "predict" and config.predict.output:
        return config.predict.output
    return workdir


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Validates, then runs config.mode; every expected failure is one line on stderr.

    The signal handlers come first, before the heavy imports: a SIGINT or SIGTERM at any
    moment of start-up ends with one line and 128 + signal (preemption.py), and the
    training loop reads the same flag.
    """
    print(
        f"[{config.mode}] {os.path.abspath(workdir)}: starting JAX, checking the config", flush=True
    )
    from metapix_jax import preemption

    with preemption.handling_signals():
        _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> None:
    from metapix_jax import (
        checkpoints,
        errors,
        filesystem,
        nonfinite,
        preemption,
        validation,
        workdir_lock,
    )
    from metapix_jax.data import sources
    from metapix_jax.models import pretrained

    expected = (
        errors.ConfigError,
        checkpoints.ModelMismatchError,
        checkpoints.NoCheckpointError,
        checkpoints.UnreadableCheckpointError,
        sources.DataError,
        nonfinite.NonFiniteError,
        pretrained.WeightFileError,
        workdir_lock.WorkdirInUseError,
    )
    try:
        validation.validate(config, workdir)
        filesystem.check_writable(output_dir(config, workdir))  # Before anything compiles.
        if config.mode in LOCKING_MODES:
            import jax  # Started by validate, which joined a multi-process run first.

            with workdir_lock.hold(workdir, holder=jax.process_index() == 0):
                dispatch(config, workdir)
        else:
            dispatch(config, workdir)
    except expected as e:
        fail(f"{type(e).__name__}: {e}")
    except preemption.Interrupted as e:
        fail(str(e), e.exit_code)
    except OSError as e:  # The workdir and its files: read-only, not a directory, full, ...
        fail(f"OSError: {filesystem.describe(e, workdir)}")
    except Exception as e:
        message = preemption.lost_process_message(e)  # A collective failed: one line.
        if message is not None:
            preemption.exit_now(message, 1)
        # TensorStore (Orbax's writer) reports a full or read-only disk as a ValueError.
        if filesystem.os_errno(e) in (*filesystem.NO_SPACE, errno.EROFS):
            fail(f"OSError: {filesystem.describe(e, workdir)}")
        raise


def dispatch(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs config.mode (already validated)."""
    from metapix_jax import compare, evaluate, predict, results, train

    if config.mode == "train":
        train.train_and_evaluate(config, workdir)
    elif config.mode == "eval":
        evaluate.evaluate_checkpoint(config, workdir)
    elif config.mode == "compare":
        compare.run_comparison(config, workdir, train.train_and_evaluate)
    elif config.mode == "results":
        results.print_results(workdir)
    elif config.mode == "predict":
        predict.run_prediction(config, workdir)
