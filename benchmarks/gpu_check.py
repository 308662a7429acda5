"""The device check: step speed at the paper's shape and a short real training run.

    bash benchmarks/gpu_check.sh --out=DIR            # one GPU, under 8 minutes, no network
    bash benchmarks/gpu_check.sh --out=DIR --smoke    # CPU, tiny shapes, about a minute

Why one script: a person with one GPU and a few minutes should come back with every figure
that BENCHMARKS.md asks for, in a form that can be pasted, without choosing flags. It runs
two stages, all in subprocesses so that each starts with an empty device:

1. `benchmarks/step_timing.py` once per (batch, dtype, remat) combination, at 1024x512 with
   the `configs/gta5.py` model: ms per step, images/s, compile time, achieved TFLOP/s, MFU
   (model FLOPs over the device's dense bf16 peak) and peak device memory per step kind.
2. `main.py` with the `configs/gta5.py` model on the embedded synthetic benchmark rendered at
   1024x512, a few hundred steps of each phase (joint, meta, weighted) with evaluation after
   the phases that change the segmenter: steps/s per phase (from the run's own
   `<kind>/steps_per_sec` TensorBoard scalars), each step kind's first-step time (compiled,
   or loaded from the cache) and the mIoU.

Compiling the steps, rather than running them, is what limits how much fits in the time (as
on the CPU), so not every combination runs: they run in priority order (`combinations`)
until the time budget (`--budget_s`) is spent, and a kind whose expected compile time would
overrun is reported as skipped rather than estimated. The paper's own setting (batch 1,
float32, no remat) runs first and its compilations are shared with stage 2 through JAX's
persistent compilation cache: both stages build the same steps from the same config.

Writes DIR/gpu_check.json (every figure), DIR/gpu_check.md (the tables) and DIR/gpu_check.log
(what the subprocesses printed). The driver imports neither jax nor the project's model
code, so no device memory is held outside the subprocesses.
"""

import argparse
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Modules main.py needs beyond the GPU host's jax, flax, optax, orbax, numpy and tensorboard;
# benchmarks/gpu_wheels.sh downloads their wheels.
NEEDED_MODULES = (
    "jax",
    "flax",
    "optax",
    "orbax.checkpoint",
    "numpy",
    "PIL",
    "tensorboard",
    "absl",
    "etils",
    "ml_collections",
    "clu",
    "grain",
    "array_record",
    "cityscapesscripts",
    "cloudpickle",
    "wrapt",
)
FIRST_SHARE = 0.6  # Of the budget, at most, for the first step-timing setting.
VERSIONS_OF = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "clu", "grain")


@dataclasses.dataclass(frozen=True)
class Combination:
    """One step_timing.py run: a batch, a dtype, remat of both networks, and its kinds."""

    batch: int
    dtype: str
    remat: bool
    kinds: tuple[str, ...]
    why: str

    @property
    def name(self) -> str:
        return f"b{self.batch}_{self.dtype}_remat_{'on' if self.remat else 'off'}"


# Kinds in ascending order of memory, so that the process's running peak after a kind is,
# as far as possible, that kind's own peak; the target step last all the same: MetaPix never
# runs it (only the target-only baseline does), so it is the one to lose to the time budget.
TRAIN_KINDS = ("eval", "joint", "weighted", "meta")
ALL_KINDS = (*TRAIN_KINDS, "target")


def combinations(small: int, large: int) -> list[Combination]:
    """In priority order; `small` and `large` are the two batch sizes (paper: 1 and 8)."""
    return [
        Combination(small, "float32", False, ALL_KINDS, "the paper's setting; stage 2 runs it"),
        Combination(small, "bfloat16", False, ALL_KINDS, "bf16 at the paper's batch"),
        Combination(large, "bfloat16", True, TRAIN_KINDS, "the throughput setting"),
        Combination(large, "bfloat16", False, TRAIN_KINDS, "what remat costs, if it fits"),
        Combination(large, "float32", True, TRAIN_KINDS, "float32 at the large batch"),
        Combination(small, "bfloat16", True, ALL_KINDS, "what remat costs at batch 1"),
    ]


@dataclasses.dataclass(frozen=True)
class Mode:
    """Everything that differs between the GPU check and its CPU smoke test."""

    name: str
    config: str
    overrides: dict
    combinations: list[Combination]
    steps: int
    warmup: int
    budget_s: float
    benchmark_workers: int
    xla_flags: str = ""  # Added to XLA_FLAGS of every subprocess.


# The same overrides reach step_timing.py and main.py, so that the steps they build are the
# same programs (stage 2 then reads stage 1's compilations from the cache).
FULL = Mode(
    name="full",
    config="configs/gta5.py",
    overrides={
        "data.synthetic": True,
        "data.height": 512,
        "data.width": 1024,
        "data.synthetic_num_source": 32,
        "data.synthetic_num_target_train": 8,
        "data.synthetic_num_target_val": 16,
        # Stage 2 at the batch of the first combination, so that it reuses its compilations.
        "data.source_batch": 1,
        "data.target_batch": 1,
        "data.eval_batch": 1,
        "schedule.joint_steps": 200,
        "schedule.meta_steps": 200,
        "schedule.weighted_steps": 200,
        "schedule.generations": 1,
        "log_every": 50,
    },
    combinations=combinations(1, 8),
    steps=8,
    warmup=2,
    budget_s=440.0,  # Under 8 minutes with the driver's own start and the final writes.
    benchmark_workers=min(8, os.cpu_count() or 1),
)
SMOKE = Mode(
    name="smoke",
    config="configs/test.py",
    overrides={
        "mode": "train",
        "method": "metapix",
        "data.source_batch": 1,
        "data.target_batch": 1,
        "data.eval_batch": 1,
        "schedule.joint_steps": 4,
        "schedule.meta_steps": 2,
        "schedule.weighted_steps": 4,
        "schedule.generations": 1,
        "log_every": 2,
    },
    # The first combination less its target step (the joint step's code path), and one kind
    # of the throughput one (bf16, remat, batch 2): every code path of the full check in a
    # fraction of its compilations, which cost tens of seconds of CPU each even at this size.
    combinations=[
        dataclasses.replace(combinations(1, 2)[0], kinds=TRAIN_KINDS),
        dataclasses.replace(combinations(1, 2)[2], kinds=("joint",)),
    ],
    steps=2,
    warmup=1,
    budget_s=3600.0,  # Never binding on CPU: the test expects every combination to run.
    benchmark_workers=1,
    # LLVM without optimisation: XLA's CPU compiler spends most of a compilation there (40 s
    # of CPU for a U-Net's random initialisation at this size, 5 s without), and the smoke
    # test checks the code path, not the CPU's speed.
    xla_flags="--xla_backend_optimization_level=0",
)


def config_flags(mode: Mode, extra: dict | None = None) -> list[str]:
    """`--config=FILE --config.a.b=v ...` for main.py and step_timing.py alike."""
    flags = [f"--config={mode.config}"]
    for key, value in {**mode.overrides, **(extra or {})}.items():
        flags.append(f"--config.{key}={value}")
    return flags


def load_config(mode: Mode):
    """The config main.py will build from the same flags (for the benchmark's parameters)."""
    import importlib

    module = importlib.import_module(mode.config.removesuffix(".py").replace("/", "."))
    config = module.get_config()
    for key, value in mode.overrides.items():
        *path, field = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[field] = value
    return config


def missing_modules() -> list[str]:
    """Needed modules that this Python cannot find."""
    missing = []
    for name in NEEDED_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for name in VERSIONS_OF:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Log:
    """Appends each subprocess's output to DIR/gpu_check.log and echoes it."""

    def __init__(self, path: str):
        self.path = path
        open(path, "w").close()

    def run(self, command: list[str], timeout: float, env: dict) -> tuple[int | None, str]:
        """Runs `command`, streaming its output; (exit status or None if killed at `timeout`,
        the output). The command gets its own process group, so that a kill also ends the
        input pipeline's worker processes."""
        with open(self.path, "a") as f:
            f.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(timeout, 1.0), kill)
        timer.start()
        lines = []
        try:
            with open(self.path, "a") as f:
                for line in process.stdout:
                    lines.append(line)
                    f.write(line)
                    f.flush()
                    print(line, end="", flush=True)
            code = process.wait()
        finally:  # Also on Ctrl-C, which the command's own process group does not receive.
            timer.cancel()
            if process.poll() is None:
                kill()
        return (None if killed.is_set() else code), "".join(lines)

    def say(self, line: str) -> None:
        print(f"[gpu_check] {line}", flush=True)
        with open(self.path, "a") as f:
            f.write(f"[gpu_check] {line}\n")


# ---- stage 1: step timing ---------------------------------------------------------------------


def time_combination(
    combo: Combination, mode: Mode, deadline: float, expected: dict, log: Log, env: dict, tmp: str
) -> list[dict]:
    """Runs step_timing.py for one combination; rows for every kind, measured or not."""
    rows_file = os.path.join(tmp, f"{combo.name}.jsonl")
    remat = {"model.remat": combo.remat, "weighting.remat": combo.remat}
    command = [
        sys.executable,
        "benchmarks/step_timing.py",
        *config_flags(mode, {"model.dtype": combo.dtype, **remat}),
        f"--batch={combo.batch}",
        f"--kinds={','.join(combo.kinds)}",
        f"--steps={mode.steps}",
        f"--warmup={mode.warmup}",
        f"--json_out={rows_file}",
        f"--deadline={deadline}",
        f"--expected_compile_s={json.dumps(expected)}",
    ]
    if combo is mode.combinations[0]:
        # main.py's own initialisation, compiled here and found in the cache by stage 2.
        command.append("--init=config")
    log.say(f"step timing {combo.name} ({combo.why})")
    # The deadline stops new kinds; the timeout ends one that compiles for far too long.
    code, output = log.run(command, deadline - time.time() + 30, env)
    rows = []
    if os.path.exists(rows_file):
        with open(rows_file) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    measured = {r["kind"] for r in rows}
    status = "killed: time budget" if code is None else f"not run: step_timing.py exited {code}"
    for kind in combo.kinds:
        if kind not in measured:
            rows.append(
                {"kind": kind, "batch": combo.batch, "dtype": combo.dtype, "status": status}
            )
    for r in rows:
        r.update(combination=combo.name, remat=combo.remat, why=combo.why)
    if code not in (0, None):
        rows[-1]["output_tail"] = output[-2000:]
    return rows


def expected_compile(rows: list[dict]) -> dict[str, float]:
    """The longest compile time seen per kind so far (the next combination's estimate)."""
    seen: dict[str, float] = {}
    for r in rows:
        if r.get("status") == "ok":
            seen[r["kind"]] = max(seen.get(r["kind"], 0.0), r["compile_s"])
    return seen


# ---- stage 2: the training run ----------------------------------------------------------------

COMPILED = re.compile(r"\] (\w+) step compiled and run \(([\d.]+) s\)")


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `logdir`, by tag: [(step, value)] in file order."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.HasField("tensor"):
                    number = float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue
                scalars.setdefault(value.tag, []).append((int(event.step), number))
    return scalars


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def phase_plan(config) -> list[dict]:
    """(kind, first position, last position) of each phase: one generation of MetaPix."""
    s = config.schedule
    plan, start = [], 0
    for kind, length in (
        ("joint", s.joint_steps),
        ("meta", s.meta_steps),
        ("weighted", s.weighted_steps),
    ):
        plan.append({"kind": kind, "steps": length, "start": start, "end": start + length})
        start += length
    return plan


def summarise_run(config, workdir: str, output: str) -> dict:
    """Steps/s per phase, compile time per kind and the evaluations of a finished run."""
    scalars = read_scalars(workdir)
    compiled = {kind: float(s) for kind, s in COMPILED.findall(output)}
    phases = []
    for phase in phase_plan(config):
        kind = phase["kind"]
        rates = [
            v
            for step, v in scalars.get(f"{kind}/steps_per_sec", [])
            if phase["start"] < step <= phase["end"]
        ]
        phases.append(
            {
                **phase,
                "steps_per_s": median(rates),
                "interval_steps_per_s": rates,
                "first_step_s": compiled.get(kind),
            }
        )
    evaluations = []
    for path in sorted(glob.glob(os.path.join(workdir, "eval", "eval_*.json"))):
        with open(path) as f:
            result = json.load(f)
        evaluations.append({"position": result["position"], "miou": 100 * result["miou"]})
    return {
        "phases": phases,
        "evaluations": evaluations,
        "miou": evaluations[-1]["miou"] if evaluations else None,
    }


def write_benchmark(mode: Mode, config, workdir: str, log: Log) -> float:
    """Renders the embedded benchmark into WORKDIR/benchmark in parallel; main.py then finds
    it (same parameters) instead of rendering it in one process. Returns the seconds taken."""
    from metapix_jax.data import datasets

    d = config.data
    start = time.perf_counter()
    datasets.write_synthetic(config, workdir, workers=mode.benchmark_workers)
    seconds = time.perf_counter() - start
    log.say(f"benchmark rendered at {d.width}x{d.height} in {seconds:.1f} s")
    return seconds


def training_run(mode: Mode, deadline: float, log: Log, env: dict, workdir: str) -> dict:
    """Stage 2: main.py for one generation of MetaPix; its figures."""
    config = load_config(mode)
    benchmark_s = write_benchmark(mode, config, workdir, log)
    command = [sys.executable, "main.py", f"--workdir={workdir}", *config_flags(mode)]
    log.say("training run (main.py)")
    start = time.perf_counter()
    code, output = log.run(command, deadline - time.time(), env)
    run = {
        "command": " ".join(["python", *command[1:]]),
        "benchmark_s": benchmark_s,
        "wall_s": time.perf_counter() - start,
        "status": "ok"
        if code == 0
        else ("killed: time budget" if code is None else f"exit {code}"),
        **summarise_run(config, workdir, output),
    }
    if code != 0:
        run["output_tail"] = output[-2000:]
    return run


# ---- report -------------------------------------------------------------------------------------


def fmt(x, spec: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(scale * x, spec)


def percent(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.3g}%"


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
    """The report as markdown: a header, the step table, the training-run table."""
    env, run = report["environment"], report["training_run"]
    lines = [
        f"# gpu_check ({report['mode']})",
        "",
        f"{env.get('device_count', '?')} x {env.get('device_kind', '?')} "
        f"({env.get('platform', '?')}); Python {env['python']}, jax {env['jax']}, "
        f"jaxlib {env['jaxlib']}, flax {env['flax']}; MFU over {env.get('peak_tflops', '?')} "
        f"TFLOP/s per device ({env.get('peak_source', '?')}); "
        f"{report['elapsed_s']:.0f} s in all (budget {report['budget_s']:.0f} s)"
        + (f"; XLA_FLAGS={env['xla_flags']}." if env.get("xla_flags") else "."),
        "",
        f"## Step timing ({report['shape']}, median of {report['steps']} calls after "
        f"{report['warmup']} warm-up calls)",
        "",
        "| batch | dtype | remat | step | ms | images/s | compile s | TFLOP/s | MFU | "
        "peak memory (running) | XLA buffers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["step_timing"]:
        head = f"| {r['batch']} | {r['dtype']} | {'on' if r['remat'] else 'off'} | {r['kind']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | | | |")
            continue
        lines.append(
            f"{head} {1e3 * r['seconds']:.1f} | {r['images_per_s']:.2f} | {r['compile_s']:.1f} | "
            f"{fmt(r['achieved_tflops'], '.3f')} | {percent(r['mfu'])} | "
            f"{gib(r['peak_memory_bytes'])} | {gib(r['xla_bytes'])} |"
        )
    lines += [
        "",
        f"## Training run ({run['status']}; {run['wall_s']:.0f} s, benchmark rendered in "
        f"{run['benchmark_s']:.1f} s)",
        "",
        f"`{run['command']}`",
        "",
        "| phase | steps | steps/s (median of log intervals) | first step s (compiled or cached) |",
        "| --- | --- | --- | --- |",
    ]
    for p in run["phases"]:
        lines.append(
            f"| {p['kind']} | {p['steps']} | {fmt(p['steps_per_s'], '.3f')} | "
            f"{fmt(p['first_step_s'], '.1f')} |"
        )
    evaluations = ", ".join(f"{e['miou']:.2f} at {e['position']}" for e in run["evaluations"])
    lines += ["", f"mIoU % (target val): {evaluations or 'none'}.", ""]
    return "\n".join(lines)


def environment(rows: list[dict]) -> dict:
    """Versions, and the device as step_timing.py saw it."""
    env = versions()
    for r in rows:
        if r.get("status") == "ok":
            for key in ("device_kind", "platform", "device_count", "peak_tflops", "peak_source"):
                env[key] = r.get(key)
            break
    return env


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for gpu_check.json/.md/.log.")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes (configs/test.py).")
    parser.add_argument("--budget_s", type=float, help="Time budget (default: by mode).")
    parser.add_argument("--keep_workdir", action="store_true", help="Keep the training run.")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    start = time.time()
    mode = SMOKE if args.smoke else FULL
    budget = args.budget_s or mode.budget_s
    deadline = start + budget
    if missing := missing_modules():
        print(
            f"gpu_check: missing Python modules {missing}. On a machine with network, run "
            "`bash benchmarks/gpu_wheels.sh` in the repository and bring its .whl/ folder "
            "along; benchmarks/gpu_check.sh installs it (BENCHMARKS.md, 'GPU check').",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    env = dict(os.environ)
    # Shared by every subprocess: stage 2 finds stage 1's compiled steps. A fresh folder
    # each time, so that the compile times reported are real ones.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    if mode.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {mode.xla_flags}".strip()
    combos = mode.combinations
    rows: list[dict] = []
    try:
        # The paper's setting first, with the time it needs but at most FIRST_SHARE of the
        # budget: stage 2, whose steps are then compiled, needs the rest.
        first_deadline = start + FIRST_SHARE * budget
        rows += time_combination(combos[0], mode, first_deadline, {}, log, env, tmp)
        workdir = os.path.join(tmp, "run")
        run = training_run(mode, deadline, log, env, workdir)
        for combo in combos[1:]:
            rows += time_combination(combo, mode, deadline, expected_compile(rows), log, env, tmp)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.say(f"kept {tmp}")
    config = load_config(mode)
    report = {
        "mode": mode.name,
        "budget_s": budget,
        "elapsed_s": time.time() - start,
        "shape": f"{config.data.width}x{config.data.height}",
        "steps": mode.steps,
        "warmup": mode.warmup,
        "environment": {**environment(rows), "xla_flags": env.get("XLA_FLAGS", "")},
        "step_timing": rows,
        "training_run": run,
    }
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
