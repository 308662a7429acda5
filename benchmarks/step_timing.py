"""Times every step kind and the eval step; not a test.

    python benchmarks/step_timing.py --config=configs/gta5.py --batch=1 \
        --config.model.dtype=bfloat16 [--config.model.remat=True] [--kinds=joint,meta]

Per step kind: median wall time over --steps calls after --warmup, images/s (source +
target images of a step), achieved TFLOP/s from XLA's cost analysis of the compiled step,
utilisation of --peak_tflops (default: from the device kind, else an H100's 989 dense
bf16), and peak device memory (device.memory_stats(); 'n/a' where the backend has none,
e.g. the CPU) beside XLA's own estimate of the step's buffers. Then the projected wall
time of the config's whole schedule (paper: 150K joint + 3 x (10K meta + 15K weighted)).
The shape, dtype and remat are the config's fields (`--config.data.height=...`, as with
main.py); `--batch` sets the source, target and eval batches together.

Imports only jax, flax, optax, numpy, absl and ml_collections (no TensorFlow, clu or grain),
so it runs on a GPU host that has nothing else.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from metapix_jax import methods, parallel, steps  # noqa: E402
from metapix_jax import state as state_lib  # noqa: E402

KINDS = ("joint", "target", "weighted", "meta", "eval")
# Dense bf16 TFLOP/s by device kind (datasheets); the first match wins.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}
DEFAULT_PEAK = 989.0  # An H100's dense bf16.

config_flags.DEFINE_config_file("config", "configs/default.py", "A config file.", lock_config=True)
flags.DEFINE_integer("batch", 1, "Global source, target and eval batch.")
flags.DEFINE_list("kinds", list(KINDS), f"Step kinds to time, of {KINDS}.")
flags.DEFINE_integer("steps", 10, "Timed calls per kind.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.")
flags.DEFINE_float("peak_tflops", None, "Per-device peak (default: by device kind).")
FLAGS = flags.FLAGS


def load_config():
    """The config file's config with --batch applied."""
    config = FLAGS.config
    d = config.data
    d.source_batch = d.target_batch = d.eval_batch = FLAGS.batch
    return config


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


def flops_of(compiled) -> float | None:
    """Per-device FLOPs of a compiled step from XLA's cost analysis (None if unavailable)."""
    cost = compiled.cost_analysis()
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
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def device_peak_tflops(requested: float | None) -> tuple[float, str]:
    """The per-device peak to compare with, and where it came from."""
    if requested is not None:
        return requested, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name in kind:
            return peak, f"{kind} dense bf16 datasheet"
    return DEFAULT_PEAK, f"H100 dense bf16 (device kind {kind!r} unknown)"


def time_kind(kind: str, fns: dict, state, batches) -> tuple[dict, object]:
    """Compiles one step kind, times it; returns its figures and the state it leaves."""
    fn = fns[kind]
    batch = batches["eval" if kind == "eval" else "train"]
    compiled = fn.lower(state, batch).compile()
    times = []
    for i in range(FLAGS.warmup + FLAGS.steps):
        start = time.perf_counter()
        if kind == "eval":
            jax.block_until_ready(compiled(state, batch))
        else:
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - start)
    figures = {"seconds": statistics.median(times), "flops": flops_of(compiled)}
    figures["xla_bytes"] = xla_buffer_bytes(compiled)
    return figures, state


def images_per_step(kind: str, batch: int) -> int:
    return batch if kind in ("target", "eval") else 2 * batch


def format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def report_line(kind: str, f: dict, batch: int, peak: float) -> str:
    devices = jax.device_count()
    rate = images_per_step(kind, batch) / f["seconds"]
    if f["flops"] is None:
        tflops, util = "n/a", "n/a"
    else:
        achieved = f["flops"] / f["seconds"] / 1e12  # per device
        tflops, util = f"{achieved * devices:.3f}", f"{100 * achieved / peak:.3g}%"
    return (
        f"| {kind} | {1e3 * f['seconds']:.1f} | {rate:.2f} | {tflops} | {util} | "
        f"{format_bytes(f['memory'])} | {format_bytes(f['xla_bytes'])} |"
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
    config = load_config()
    mesh = parallel.make_mesh()
    if problems := parallel.batch_size_problems(config, jax.device_count(), jax.process_count()):
        raise app.UsageError("; ".join(problems))
    fns = methods.compile_steps(config, mesh, [k for k in kinds if k != "eval"])
    fns["eval"] = steps.make_inference(config, mesh).confusion
    state = parallel.put_replicated(state_lib.init_state(config), mesh)
    batches = random_batches(config, mesh)
    peak, peak_source = device_peak_tflops(FLAGS.peak_tflops)
    device = jax.devices()[0]
    d, m = config.data, config.model
    print(
        f"jax {jax.__version__} on {jax.device_count()} x {device.platform} "
        f"({device.device_kind}); {d.height}x{d.width}, global batch {FLAGS.batch}, "
        f"{m.dtype}, remat={m.remat}, model.width={m.width:g}, "
        f"median of {FLAGS.steps} after {FLAGS.warmup} warm-up calls; "
        f"peak {peak:g} TFLOP/s per device ({peak_source})"
    )
    print(
        "| step | ms | images/s | TFLOP/s (all devices) | of peak | peak device memory | "
        "XLA buffers per device |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    seconds = {}
    for kind in kinds:
        figures, state = time_kind(kind, fns, state, batches)
        figures["memory"] = peak_device_memory()
        seconds[kind] = figures["seconds"]
        print(report_line(kind, figures, FLAGS.batch, peak), flush=True)
    total = projected_seconds(config, seconds)
    s = config.schedule
    if total is not None:
        print(
            f"projected schedule ({s.joint_steps} joint + {s.generations} x ({s.meta_steps} "
            f"meta + {s.weighted_steps} weighted) steps, no eval/checkpoints): "
            f"{total / 3600:.2f} h"
        )


if __name__ == "__main__":
    app.run(main)
