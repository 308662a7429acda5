"""Times every step kind and the eval step; not a test.

    python benchmarks/step_timing.py --config=configs/gta5.py --batch=1 \
        --config.model.dtype=bfloat16 [--config.model.remat=True] [--kinds=joint,meta]

Per step kind: median wall time over --steps calls after --warmup, images/s (source +
target images of a step), the compile time, achieved TFLOP/s from XLA's cost analysis of
the compiled step (what the device executed, recomputation included), MFU (the step's
model FLOPs, i.e. the unoptimised step without rematerialisation, per second, over
--peak_tflops; default: the device kind's dense bf16 peak, else an H100's 989), and peak
device memory (device.memory_stats(); 'n/a' where the backend has none, e.g. the CPU)
beside XLA's own estimate of the step's buffers. Then the projected wall time of the
config's whole schedule (paper: 150K joint + 3 x (10K meta + 15K weighted)).
The shape, dtype and remat are the config's fields (`--config.data.height=...`, as with
main.py); `--batch` sets the source, target and eval batches together.

`benchmarks/gpu_check.py` runs this script once per (batch, dtype, remat) combination, with
`--json_out` (one JSON line per kind, written as soon as it is measured, so that a run
stopped at its time limit keeps what it measured) and `--deadline` (kinds whose expected
compile time would run past it are skipped and reported as such).

Imports only jax, flax, optax, numpy, absl and ml_collections (no TensorFlow, clu or grain),
so it runs on a GPU host that has nothing else.
"""

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from metapix_jax import methods, parallel, steps  # noqa: E402
from metapix_jax import state as state_lib  # noqa: E402

KINDS = ("joint", "target", "weighted", "meta", "eval")
# Dense bf16 TFLOP/s by device kind (datasheets); the first match wins, so a name that
# contains another (H100 PCIe, H100) comes first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
DEFAULT_PEAK = 989.0  # An H100's dense bf16.
# A kind is skipped when its expected compile time times this would pass --deadline: the
# timed calls and the memory statistics come on top of the compilation.
COMPILE_MARGIN = 1.25

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags; only when it runs as a script, so that importing it defines none."""
    config_flags.DEFINE_config_file(
        "config", "configs/default.py", "A config file.", lock_config=True
    )
    flags.DEFINE_integer("batch", 1, "Global source, target and eval batch.")
    flags.DEFINE_list("kinds", list(KINDS), f"Step kinds to time, in this order, of {KINDS}.")
    flags.DEFINE_integer("steps", 10, "Timed calls per kind.")
    flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.")
    flags.DEFINE_float("peak_tflops", None, "Per-device peak (default: by device kind).")
    flags.DEFINE_enum(
        "init",
        "placeholder",
        ["placeholder", "config"],
        "The state the steps start from: random values of the right shapes (no init program "
        "compiled), or the config's own initialisation as in main.py.",
    )
    flags.DEFINE_string("json_out", "", "Append one JSON line per kind to this file.")
    flags.DEFINE_float("deadline", 0.0, "Unix time after which no kind is started (0: none).")
    flags.DEFINE_string(
        "expected_compile_s", "{}", "JSON {kind: seconds}: compile times seen elsewhere."
    )


def with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
    """The config with `batch` as its source, target and eval batch."""
    d = config.data
    d.source_batch = d.target_batch = d.eval_batch = batch
    return config


def placeholder_state(config, mesh):
    """A state of the config's shapes and dtypes, with small random floats and zero integers.

    Made on the host from `jax.eval_shape`, so no initialisation program is compiled: that
    costs as much as compiling a step (tens of seconds of CPU even at configs/test.py's
    size), once per process, and step times do not depend on the values.
    """
    rng = np.random.default_rng(0)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            return (0.01 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)  # Step counters, position, the PRNG key.

    shapes = jax.eval_shape(lambda: state_lib.init_state(config))
    return parallel.put_replicated(jax.tree.map(fill, shapes), mesh)


def initial_state(config, mesh, init: str):
    """'config': the state main.py starts from (state.init_state, compiled); 'placeholder':
    `placeholder_state`."""
    if init == "config":
        return parallel.put_replicated(state_lib.init_state(config), mesh)
    return placeholder_state(config, mesh)


def random_batches(config, mesh) -> dict[str, dict]:
    """A train batch and an eval batch of random images and labels, split over the mesh."""
    rng = np.random.default_rng(0)
    b, h, w = config.data.source_batch, config.data.height, config.data.width
    image = lambda: rng.normal(size=(b, h, w, 3)).astype(np.float32)  # noqa: E731
    label = lambda: rng.integers(0, config.data.num_classes, (b, h, w)).astype(np.int32)  # noqa: E731
    train = {"source_image": image(), "source_label": label()}
    train.update(target_image=image(), target_label=label())
    evaluation = {"image": image(), "label": label()}
    return {"train": parallel.to_global(train, mesh), "eval": parallel.to_global(evaluation, mesh)}


def flops_of(analysed) -> float | None:
    """Per-device FLOPs from a compiled or lowered step's cost analysis (None if unavailable)."""
    try:
        cost = analysed.cost_analysis()
    except Exception:  # Some backends cannot analyse an unoptimised module.
        return None
    if isinstance(cost, list | tuple):  # Older jax: one dict per computation.
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def xla_buffer_bytes(compiled) -> int | None:
    """XLA's estimate of a step's arguments + outputs + temporaries, per device."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return int(
        sum(getattr(memory, f, 0) for f in fields) - getattr(memory, "alias_size_in_bytes", 0)
    )


def peak_device_memory() -> int | None:
    """The allocator's peak since the process started (None where the backend keeps none)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def device_peak_tflops(requested: float | None) -> tuple[float, str]:
    """The per-device peak to compare with, and where it came from."""
    if requested is not None:
        return requested, "--peak_tflops"
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name in kind:
            return peak, f"{kind} dense bf16 datasheet"
    return DEFAULT_PEAK, f"H100 dense bf16 (device kind {kind!r} unknown)"


def step_functions(config, mesh, kinds) -> dict[str, Callable]:
    """The jitted steps exactly as main.py builds them, plus the eval step."""
    fns = methods.compile_steps(config, mesh, [k for k in kinds if k != "eval"])
    if "eval" in kinds:
        fns["eval"] = steps.make_inference(config, mesh).confusion
    return fns


def without_remat(config) -> ml_collections.ConfigDict:
    """A copy of the config with rematerialisation off in both networks."""
    plain = config.copy_and_resolve_references()
    plain.model.remat = False
    plain.weighting.remat = False
    return plain


def model_flops(kind: str, config, mesh, state, batch, lowered) -> float | None:
    """FLOPs of the step as written: the unoptimised module of its remat-off version.

    XLA's count for the compiled step includes what rematerialisation recomputes; MFU
    counts only the model's own arithmetic, the same for remat on and off.
    """
    if config.model.remat or config.weighting.remat:
        lowered = step_functions(without_remat(config), mesh, [kind])[kind].lower(state, batch)
    return flops_of(lowered)


def images_per_step(kind: str, batch: int) -> int:
    return batch if kind in ("target", "eval") else 2 * batch


def time_kind(kind: str, fn, config, mesh, state, batches, steps_: int, warmup: int):
    """Compiles one step kind and times it; returns its figures and the state it leaves."""
    batch = batches["eval" if kind == "eval" else "train"]
    start = time.perf_counter()
    lowered = fn.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + steps_):
        start = time.perf_counter()
        if kind == "eval":
            jax.block_until_ready(compiled(state, batch))
        else:
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    figures = {
        "seconds": statistics.median(times),
        "compile_s": compile_s,
        "flops": flops_of(compiled),
        "model_flops": model_flops(kind, config, mesh, state, batch, lowered),
        "xla_bytes": xla_buffer_bytes(compiled),
        "peak_memory_bytes": peak_device_memory(),
    }
    return figures, state


def derived(figures: dict, kind: str, batch: int, peak: float, devices: int) -> dict:
    """images/s, achieved TFLOP/s (all devices) and MFU (per device over its peak)."""
    seconds = figures["seconds"]
    out = {"images_per_s": images_per_step(kind, batch) / seconds}
    flops, model = figures["flops"], figures["model_flops"]
    out["achieved_tflops"] = None if flops is None else flops * devices / seconds / 1e12
    out["mfu"] = None if model is None else model / seconds / 1e12 / peak
    return out


def expected_seconds(kind: str, expected: dict[str, float], seen: dict[str, float]):
    """What compiling `kind` is expected to take: seen here or elsewhere; None if unknown."""
    known = {**expected, **seen}
    if kind in known:
        return known[kind]
    return max(known.values()) if known else None


def combination(config, batch: int) -> dict:
    """The fields that name a row's combination."""
    m, w, d = config.model, config.weighting, config.data
    return {
        "batch": batch,
        "dtype": m.dtype,
        "remat": bool(m.remat),
        "unet_remat": bool(w.remat),
        "height": d.height,
        "width": d.width,
    }


def time_steps(
    config: ml_collections.ConfigDict,
    kinds,
    *,
    steps_: int = 10,
    warmup: int = 2,
    peak: float = DEFAULT_PEAK,
    deadline: float = 0.0,
    expected_compile: dict[str, float] | None = None,
    init: str = "placeholder",
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """One row per kind, in the order given; a kind that fails (e.g. out of memory) or would
    compile past `deadline` gets a row with its status instead of figures."""
    mesh = parallel.make_mesh()
    if problems := parallel.batch_size_problems(config, jax.device_count(), jax.process_count()):
        raise ValueError("; ".join(problems))
    batch = config.data.source_batch
    fns = step_functions(config, mesh, kinds)
    fresh = lambda: initial_state(config, mesh, init)  # noqa: E731
    state = batches = None  # Made for the first kind that runs.
    seen: dict[str, float] = {}
    rows = []
    for kind in kinds:
        row = {"kind": kind, **combination(config, batch), "devices": jax.device_count()}
        guess = expected_seconds(kind, expected_compile or {}, seen)
        if deadline and guess is not None and time.time() + COMPILE_MARGIN * guess > deadline:
            row["status"] = f"skipped: time budget (compile expected {guess:.0f} s)"
        else:
            try:
                if state is None:
                    state, batches = fresh(), random_batches(config, mesh)
                figures, state = time_kind(
                    kind, fns[kind], config, mesh, state, batches, steps_, warmup
                )
            except Exception as e:  # Out of memory, most likely: report it, go on.
                first_line = (str(e).splitlines() or [""])[0]
                row["status"] = f"error: {type(e).__name__}: {first_line[:300]}"
                state = None  # The failed call may have consumed the donated state.
            else:
                seen[kind] = figures["compile_s"]
                row.update(figures, **derived(figures, kind, batch, peak, jax.device_count()))
                row["status"] = "ok"
        rows.append(row)
        on_row(row)
    return rows


def format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_number(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


TABLE_HEADER = (
    "| step | ms | images/s | compile s | TFLOP/s (all devices) | MFU | peak device memory | "
    "XLA buffers per device |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def report_line(row: dict) -> str:
    """A markdown row; a skipped or failed kind shows its status."""
    if row["status"] != "ok":
        return f"| {row['kind']} | {row['status']} | | | | | | |"
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.3g}%"
    return (
        f"| {row['kind']} | {1e3 * row['seconds']:.1f} | {row['images_per_s']:.2f} | "
        f"{row['compile_s']:.1f} | {format_number(row['achieved_tflops'], '.3f')} | {mfu} | "
        f"{format_bytes(row['peak_memory_bytes'])} | {format_bytes(row['xla_bytes'])} |"
    )


def projected_seconds(config, seconds: dict[str, float]) -> float | None:
    """Wall time of the config's schedule: N1 joint + G (N2 meta + N3 weighted) steps."""
    s = config.schedule
    if not {"joint", "meta", "weighted"} <= seconds.keys():
        return None
    per_generation = s.meta_steps * seconds["meta"] + s.weighted_steps * seconds["weighted"]
    return s.joint_steps * seconds["joint"] + s.generations * per_generation


def main(argv: list[str]) -> None:
    del argv
    kinds = FLAGS.kinds
    if unknown := set(kinds) - set(KINDS):
        raise app.UsageError(f"--kinds: unknown {sorted(unknown)}; choose from {KINDS}")
    config = with_batch(FLAGS.config, FLAGS.batch)
    peak, peak_source = device_peak_tflops(FLAGS.peak_tflops)
    device = jax.devices()[0]
    d, m = config.data, config.model
    print(
        f"jax {jax.__version__} on {jax.device_count()} x {device.platform} "
        f"({device.device_kind}); {d.height}x{d.width}, global batch {FLAGS.batch}, "
        f"{m.dtype}, remat={m.remat}, U-Net remat={config.weighting.remat}, "
        f"model.width={m.width:g}, median of {FLAGS.steps} after {FLAGS.warmup} warm-up calls; "
        f"MFU over {peak:g} TFLOP/s per device ({peak_source})"
    )
    print(TABLE_HEADER, flush=True)

    about = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "peak_tflops": peak,
        "peak_source": peak_source,
    }

    def on_row(row: dict) -> None:
        print(report_line(row), flush=True)
        if FLAGS.json_out:
            with open(FLAGS.json_out, "a") as f:
                f.write(json.dumps({**row, **about}) + "\n")

    try:
        rows = time_steps(
            config,
            kinds,
            steps_=FLAGS.steps,
            warmup=FLAGS.warmup,
            peak=peak,
            deadline=FLAGS.deadline,
            expected_compile=json.loads(FLAGS.expected_compile_s),
            init=FLAGS.init,
            on_row=on_row,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    seconds = {r["kind"]: r["seconds"] for r in rows if r["status"] == "ok"}
    total = projected_seconds(config, seconds)
    s = config.schedule
    if total is not None:
        print(
            f"projected schedule ({s.joint_steps} joint + {s.generations} x ({s.meta_steps} "
            f"meta + {s.weighted_steps} weighted) steps, no eval/checkpoints): "
            f"{total / 3600:.2f} h"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
