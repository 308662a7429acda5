"""train_and_evaluate: the phase loop of Algorithm 1, with logging and checkpoints.

Starting and resuming are one code path: the state is restored from the latest
checkpoint if there is one, the input streams are opened at its position, and the loop
runs whatever is left of the schedule.
"""

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics
from jax.experimental import multihost_utils

from metapix_jax import checkpoints, evaluate, nonfinite, parallel, schedule, validation
from metapix_jax import state as state_lib
from metapix_jax.data import labels, pipeline, prepare, sources, synthetic
from metapix_jax.data import normalization as normalization_lib
from metapix_jax.state import TrainState
from metapix_jax.steps import Steps


@dataclasses.dataclass(frozen=True)
class Data:
    """The image/label file pairs of a run."""

    source: list[tuple[str, str]]
    target_train: list[tuple[str, str]]
    target_eval: list[tuple[str, str]]


def benchmark_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.data.synthetic_root or os.path.join(workdir, "benchmark")


def prepare_synthetic(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the embedded benchmark (once per parameter set); returns its root."""
    d = config.data
    root = benchmark_root(config, workdir)
    if jax.process_index() == 0:
        synthetic.write_benchmark(
            root,
            seed=d.synthetic_seed,
            height=d.height,
            width=d.width,
            num_source=d.synthetic_num_source,
            num_target_train=d.synthetic_num_target_train,
            num_target_val=d.synthetic_num_target_val,
            gap=d.synthetic_gap,
            harm_rate=d.synthetic_harm_rate,
            confusions=synthetic.parse_confusions(d.synthetic_confusions),
        )
    if jax.process_count() > 1:  # The other processes read what process 0 wrote.
        multihost_utils.sync_global_devices("synthetic benchmark written")
    return root


def data_roots(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(source root, target root): the configured ones, or the embedded benchmark's."""
    if config.data.synthetic:
        root = prepare_synthetic(config, workdir)
        return os.path.join(root, "gta5"), os.path.join(root, "cityscapes")
    return config.data.source_root, config.data.target_root


def target_examples(config: ml_collections.ConfigDict, target_root: str, split: str, list_file):
    """One target split: Cityscapes folder pairs (restricted to the list file) or TFDS."""
    d = config.data
    if d.target_format == "tfds":
        from metapix_jax.data import tfds_source  # Imports TensorFlow: only when chosen.

        return tfds_source.TfdsExamples(split, d.tfds_data_dir)
    if d.target_format != "folder":
        raise ValueError(f"data.target_format must be 'folder' or 'tfds', got {d.target_format!r}")
    pairs = sources.cityscapes_pairs(target_root, split)
    return sources.restrict_to_list(pairs, target_root, list_file)


def source_examples(config: ml_collections.ConfigDict, source_root: str):
    """The source dataset: prepared array_record if configured, else the layout's PNG pairs."""
    d = config.data
    if d.source_prepared:
        return prepare.PreparedExamples(d.source_prepared, (d.height, d.width))
    pairs = sources.source_pairs(d.source_kind, source_root)
    return sources.restrict_to_list(pairs, source_root, d.source_list)


def load_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    source_root, target_root = data_roots(config, workdir)
    d = config.data
    return Data(
        source=source_examples(config, source_root) if schedule.needs_source(config) else [],
        target_train=target_examples(
            config, target_root, d.target_train_split, d.target_train_list
        ),
        target_eval=target_examples(config, target_root, d.target_eval_split, d.target_eval_list),
    )


def train_stream(
    config: ml_collections.ConfigDict, pairs, domain: str, position: int
) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the endless `domain` stream, from batch `position` on."""
    d = config.data
    return pipeline.train_batches(
        pairs,
        prepare.source_id_table(d.source_kind)
        if domain == "source"
        else labels.CITYSCAPES_ID_TO_TRAIN_ID,
        batch_size=d.source_batch if domain == "source" else d.target_batch,
        size=(d.height, d.width),
        seed=config.seed + (0 if domain == "source" else 1),
        flip=d.target_flip and domain == "target",
        normalization=d.normalization,
        start_step=position,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_threads=d.num_threads,
        num_workers=d.num_workers,
        skip_bad=d.skip_bad_files,
    )


def eval_stream(config: ml_collections.ConfigDict, pairs) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over the target eval split (this process's rows of each batch)."""
    d = config.data
    batches = pipeline.eval_batches(
        pairs,
        labels.CITYSCAPES_ID_TO_TRAIN_ID,
        batch_size=d.eval_batch,
        size=(d.height, d.width),
        normalization=d.normalization,
        num_threads=d.num_threads,
        protocol=d.eval_protocol,
        skip_bad=d.skip_bad_files,
    )
    share = d.eval_batch // jax.process_count()
    start = jax.process_index() * share
    for batch in batches:
        yield {k: v[start : start + share] for k, v in batch.items()}


class Batches:
    """Joined source/target batches for consecutive schedule positions."""

    def __init__(self, config: ml_collections.ConfigDict, data: Data, position: int):
        self.target = train_stream(config, data.target_train, "target", position)
        self.source = (
            train_stream(config, data.source, "source", position)
            if schedule.needs_source(config)
            else None
        )

    def __next__(self) -> dict[str, np.ndarray]:
        t = next(self.target)
        batch = {"target_image": t["image"], "target_label": t["label"]}
        if self.source is not None:
            s = next(self.source)
            batch.update(source_image=s["image"], source_label=s["label"])
        return batch


def begin_phase(
    state: TrainState, phase: schedule.Phase, config: ml_collections.ConfigDict
) -> TrainState:
    """What happens once at the start of a phase, before its first step (and on resume)."""
    reinit = config.meta.reinit_per_generation and phase.generation > 1
    if phase.kind in schedule.WEIGHT_LEARNING_KINDS and reinit:
        unet_params, unet_opt_state = state_lib.fresh_weighting(config, phase.generation - 1)
        state = state.replace(unet_params=unet_params, unet_opt_state=unet_opt_state)
    if phase.kind in schedule.WEIGHTED_OPTIMIZER_KINDS and config.optim.fresh_weighted_optimizer:
        tx = state_lib.weighted_phase_optimizer(config)
        state = state.replace(opt_state=tx.init(state.params))
    return state


class Progress:
    """Steps/s per step kind and an ETA for the rest of the schedule."""

    def __init__(self, plan: list[schedule.Phase]):
        self.plan = plan
        self.seconds_per_step: dict[str, float] = {}
        self.mark: tuple[int, float] | None = None

    def restart(self, position: int) -> None:
        """Starts timing after a compilation or an evaluation, which are not steps."""
        self.mark = (position, time.perf_counter())

    def update(self, kind: str, position: int) -> float:
        """Records the speed since the last mark; returns steps/s."""
        if self.mark is None or position <= self.mark[0]:
            return float("nan")
        steps, seconds = position - self.mark[0], time.perf_counter() - self.mark[1]
        self.seconds_per_step[kind] = seconds / steps
        self.restart(position)
        return steps / seconds

    def eta_seconds(self, position: int) -> float:
        known = self.seconds_per_step
        fallback = max(known.values()) if known else float("nan")
        return sum(
            max(0, p.end - max(position, p.start)) * known.get(p.kind, fallback) for p in self.plan
        )


def format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@functools.lru_cache
def metrics_collection(names: tuple[str, ...]) -> type[metrics.Collection]:
    """A clu Collection that averages each named scalar over a logging interval.

    Cached: the class is built once per set of names, not at every step.
    """
    return metrics.Collection.create(**{name: metrics.Average.from_output(name) for name in names})


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was not finite (config.nonfinite='stop')."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: the state was saved at a step boundary; rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # The shell's convention for "ended by a signal".


class InterruptFlag:
    """SIGTERM/SIGINT set a flag that the loop reads at step boundaries.

    A second signal of either kind ends the process at once (the default action), so a
    second Ctrl-C still aborts a run that is slow to reach its next step boundary; the
    checkpoints on disk stay valid because every save is atomic.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"{signal.Signals(signum).name}: saving a checkpoint at the next step boundary "
            "(send it again to abort now)",
            flush=True,
        )

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():  # Only there can Python.
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def fault_after_step(position: int) -> None:
    """Test-only fault hook (checkpoints.KILL_ENV): 'position:P' kills the process
    (SIGKILL) right after the step to position P, before it is saved; 'sigterm:P' and
    'sigint:P' send that signal to this process there. Never set it in use."""
    hook = os.environ.get(checkpoints.KILL_ENV, "")
    action, _, at = hook.partition(":")
    if at != str(position):
        return
    signums = {"position": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
    if action in signums:
        os.kill(os.getpid(), signums[action])


class NonFiniteGuard:
    """The steps' `nonfinite` flags since the last check, read only at checks.

    Checked at log time and before every save, so that with 'stop' no checkpoint is ever
    written from a state that followed a non-finite loss or gradient.
    """

    def __init__(self, mode: str, total: int):
        self.mode = mode
        self.total = total
        self.pending: list[tuple[int, dict]] = []
        self.skipped = 0

    def record(self, position: int, step_metrics: dict) -> None:
        self.pending.append((position, step_metrics))

    def check(self, phase: schedule.Phase, last_checkpoint: int | None) -> int:
        """Raises NonFiniteError ('stop'); returns the steps skipped since the last check."""
        pending, self.pending = jax.device_get(self.pending), []
        bad = [(p, m) for p, m in pending if m[nonfinite.FLAG] > 0]
        if bad and self.mode == "stop":
            position, values = bad[0]
            shown = ", ".join(
                f"{k}={float(v):.4g}" for k, v in sorted(values.items()) if k != nonfinite.FLAG
            )
            kept = "none yet" if last_checkpoint is None else f"position {last_checkpoint}"
            raise NonFiniteError(
                f"non-finite loss or gradient at step {position - phase.start} of phase "
                f"{phase.name} (position {position} of {self.total}): {shown}; stopped without "
                f"saving; the last checkpoint ({kept}) is intact: rerun to resume from it, or "
                "set --config.nonfinite=skip to skip such steps"
            )
        self.skipped += len(bad)
        return len(bad)


def to_uint8_image(image: np.ndarray, normalization: str) -> np.ndarray:
    """Undoes the input normalisation of one image for display."""
    pixels = normalization_lib.to_pixels(image, normalization)
    rgb = pixels[..., ::-1] if normalization == "caffe" else pixels  # Caffe's order is BGR.
    return np.clip(rgb, 0, 255).astype(np.uint8)


def image_summaries(
    state: TrainState, steps: Steps, batch: dict[str, jax.Array], config, phase
) -> dict[str, np.ndarray]:
    """First image of the batch: source, its label and weights; target and prediction."""
    norm = config.data.normalization
    first = lambda x: np.asarray(jax.device_get(x))[:1]  # noqa: E731
    prediction = np.argmax(first(steps.predict(state, batch["target_image"])), -1)
    images = {
        "target/image": to_uint8_image(first(batch["target_image"]), norm),
        "target/label": labels.colorize(first(batch["target_label"])),
        "target/prediction": labels.colorize(prediction),
    }
    if "source_image" in batch:
        images["source/image"] = to_uint8_image(first(batch["source_image"]), norm)
        images["source/label"] = labels.colorize(first(batch["source_label"]))
        if phase.kind in schedule.WEIGHT_KINDS:
            w = first(steps.weights(state, batch))
            if w.ndim == 4:  # W19: show the weight of the labeled class.
                safe = np.clip(first(batch["source_label"]), 0, w.shape[-1] - 1)
                w = np.take_along_axis(w, safe[..., None], -1)[..., 0]
            images["source/weights"] = (np.clip(w, 0, 1) * 255).astype(np.uint8)[..., None]
    return images


def run_evaluation(
    state: TrainState, steps: Steps, data: Data, config, mesh, workdir: str, writer
) -> dict:
    """mIoU on the target eval split; written as JSON in the workdir and to TensorBoard."""
    confusion = evaluate.confusion_over(state, steps, eval_stream(config, data.target_eval), mesh)
    position = int(state.position)
    result = {
        "method": config.method,
        "position": position,
        "segmenter_steps": int(state.step),
        "eval_split": config.data.target_eval_split,
        "eval_protocol": config.data.eval_protocol,
        **evaluate.summarize(confusion, labels.CLASS_NAMES),
    }
    if config.data.source_kind == "synthia":  # The field's 16- and 13-class means.
        result["miou_16"] = evaluate.subset_mean_iou(confusion, evaluate.SYNTHIA_16)
        result["miou_13"] = evaluate.subset_mean_iou(confusion, evaluate.SYNTHIA_13)
    scalars = {f"eval/{k}": result[k] for k in ("miou", "miou_16", "miou_13") if k in result}
    scalars.update(
        {f"eval/iou/{k}": v for k, v in result["per_class_iou"].items() if v is not None}
    )
    writer.write_scalars(position, scalars)
    writer.flush()
    if jax.process_index() == 0:
        out = os.path.join(workdir, "eval")
        os.makedirs(out, exist_ok=True)
        text = json.dumps(result, indent=2)
        for name in (f"eval_{position:08d}.json", "latest.json"):
            with open(os.path.join(out, name), "w") as f:
                f.write(text)
    logging.info("eval at position %d: mIoU %.4f", position, result["miou"])
    print(f"[{config.method}] eval at position {position}: mIoU {100 * result['miou']:.2f}")
    return result


def save_checkpoint(manager, state: TrainState, guard: NonFiniteGuard, phase) -> None:
    """Saves after making sure no step since the last check was non-finite."""
    guard.check(phase, manager.latest_step())
    checkpoints.save(manager, state)


def stop_if_interrupted(
    interrupt: InterruptFlag, manager, state: TrainState, guard: NonFiniteGuard, phase
) -> None:
    """At a step boundary after a signal: save, then end the run with Interrupted."""
    if interrupt.signum is None:
        return
    save_checkpoint(manager, state, guard, phase)
    position = int(state.position)
    raise Interrupted(
        f"interrupted at position {position} of {guard.total} (phase {phase.name}); "
        "checkpoint saved; run the same command to resume",
        interrupt.signum,
    )


def log_interval(
    state: TrainState, phase, collection, skipped: int, *, config, writer, progress, position
) -> None:
    """Writes the interval's averages and prints a progress line."""
    summary = {k: float(v) for k, v in collection.compute().items()} if collection else {}
    if skipped:
        summary[nonfinite.FLAG] = skipped  # Steps skipped in this interval.
    rate = progress.update(phase.kind, position)
    scalars = {f"{phase.kind}/{k}": v for k, v in summary.items()}
    scalars[f"{phase.kind}/steps_per_sec"] = rate
    scalars["learning_rate"] = learning_rate(config, phase, int(state.step))
    writer.write_scalars(position, scalars)
    eta = format_seconds(progress.eta_seconds(position))
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items()))
    print(
        f"[{config.method}] {phase.name} {position - phase.start}/{phase.length} "
        f"(position {position}/{phase_total(progress)}) {shown} "
        f"{rate:.2f} steps/s ETA {eta}",
        flush=True,
    )


def merge_step_metrics(collection, step_metrics: dict):
    """Adds a step's metrics to the interval's averages; skipped steps do not count."""
    values = {k: v for k, v in step_metrics.items() if k != nonfinite.FLAG}
    cls = metrics_collection(tuple(sorted(values)))
    kept = (step_metrics[nonfinite.FLAG] == 0).reshape(1)
    merged = cls.single_from_model_output(**{k: v.reshape(1) for k, v in values.items()}, mask=kept)
    return merged if collection is None else collection.merge(merged)


def run_phase(
    state: TrainState,
    phase: schedule.Phase,
    *,
    steps: Steps,
    batches: Batches,
    config,
    mesh,
    manager,
    writer,
    progress: Progress,
    guard: NonFiniteGuard,
    interrupt: InterruptFlag,
) -> TrainState:
    """Runs the phase's remaining steps, logging and checkpointing along the way."""
    step_fn = getattr(steps, phase.kind)
    collection = None
    first = int(state.position)
    for position in range(first, phase.end):
        batch = parallel.to_global(next(batches), mesh)
        state, step_metrics = step_fn(state, batch)
        new_position = position + 1
        fault_after_step(new_position)
        if position == first:
            jax.block_until_ready(state.position)
            progress.restart(new_position)  # Do not count the compilation.
        guard.record(new_position, step_metrics)
        collection = merge_step_metrics(collection, step_metrics)
        if new_position % config.log_every == 0 or new_position == phase.end:
            skipped = guard.check(phase, manager.latest_step())
            log_interval(
                state, phase, collection, skipped,
                config=config, writer=writer, progress=progress, position=new_position,
            )  # fmt: skip
            collection = None
        if config.image_every and new_position % config.image_every == 0:
            writer.write_images(new_position, image_summaries(state, steps, batch, config, phase))
        if config.checkpoint_every and new_position % config.checkpoint_every == 0:
            save_checkpoint(manager, state, guard, phase)
            progress.restart(new_position)
        stop_if_interrupted(interrupt, manager, state, guard, phase)
    return state


def phase_total(progress: Progress) -> int:
    return progress.plan[-1].end if progress.plan else 0


def learning_rate(config, phase: schedule.Phase, segmenter_step: int) -> float:
    """The segmenter's lr at a step, for the logs (mirrors state.segmenter_optimizer)."""
    o = config.optim
    if phase.kind in schedule.WEIGHTED_OPTIMIZER_KINDS and o.fresh_weighted_optimizer:
        horizon, base = config.schedule.weighted_steps, o.weighted_learning_rate
        segmenter_step -= config.schedule.joint_steps + (phase.generation - 1) * horizon
    else:
        horizon, base = state_lib.total_segmenter_steps(config), o.learning_rate
    fraction = min(max(segmenter_step, 0), horizon) / max(horizon, 1)
    return base * (1 - fraction) ** o.poly_power


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json (atomically: a crash never leaves half a file to compare with)."""
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a workdir trained with other settings unless allowed; says what changed."""
    changes = validation.check_config_unchanged(config, workdir)
    if changes:
        print(f"[{config.method}] config changed (allowed): " + "; ".join(changes), flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the configured method's schedule; returns the final evaluation.

    SIGTERM/SIGINT end it with Interrupted after a checkpoint at the next step boundary;
    a non-finite step ends it with NonFiniteError (config.nonfinite='stop').
    """
    parallel.initialize_distributed(config)  # Before anything touches a device.
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(config, workdir)
    plan = schedule.phases(config)
    parallel.check_batch_sizes(config)
    data = load_data(config, workdir)
    mesh = parallel.make_mesh()
    steps = parallel.make_steps(config, mesh)
    manager = checkpoints.make_manager(
        workdir, [p.end for p in plan], config.keep_periodic, cleanup=True
    )
    restored = checkpoints.restore_latest_readable(manager, parallel.state_template(config, mesh))
    state = parallel.put_replicated(restored or state_lib.init_state(config), mesh)
    save_config(config, workdir)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    position = int(state.position)
    if position:
        print(f"[{config.method}] resuming at position {position}", flush=True)
    progress = Progress(plan)
    guard = NonFiniteGuard(config.nonfinite, phase_total(progress))
    batches = Batches(config, data, position)
    result = None
    with metric_writers.ensure_flushes(writer), InterruptFlag() as interrupt:
        for phase in plan:
            if int(state.position) >= phase.end:
                continue
            stop_if_interrupted(interrupt, manager, state, guard, phase)
            if int(state.position) == phase.start:
                state = parallel.put_replicated(begin_phase(state, phase, config), mesh)
            state = run_phase(
                state,
                phase,
                steps=steps,
                batches=batches,
                config=config,
                mesh=mesh,
                manager=manager,
                writer=writer,
                progress=progress,
                guard=guard,
                interrupt=interrupt,
            )
            save_checkpoint(manager, state, guard, phase)
            if config.eval_at_phase_end or phase is plan[-1]:
                result = run_evaluation(state, steps, data, config, mesh, workdir, writer)
                progress.restart(int(state.position))
        if result is None:  # Nothing left to train: evaluate what the checkpoint holds.
            result = run_evaluation(state, steps, data, config, mesh, workdir, writer)
    manager.close()
    if guard.skipped:
        print(
            f"[{config.method}] skipped {guard.skipped} steps with a non-finite loss or "
            "gradient (config.nonfinite='skip')",
            flush=True,
        )
    return {**result, "nonfinite_skipped": guard.skipped}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Eval mode: mIoU of the latest checkpoint, or of the one at config.eval_checkpoint."""
    parallel.initialize_distributed(config)  # Before anything touches a device.
    manager = checkpoints.make_manager(workdir)
    if manager.latest_step() is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoints.checkpoint_dir(workdir)}: train first "
            "(mode=train) or point --workdir at a trained run"
        )
    parallel.check_batch_sizes(config)
    data = load_data(config, workdir)
    mesh = parallel.make_mesh()
    steps = parallel.make_steps(config, mesh)
    position = None if config.eval_checkpoint < 0 else config.eval_checkpoint
    state = checkpoints.restore(manager, parallel.state_template(config, mesh), position)
    state = parallel.put_replicated(state, mesh)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    with metric_writers.ensure_flushes(writer):
        result = run_evaluation(state, steps, data, config, mesh, workdir, writer)
    manager.close()
    return result
