"""train_and_evaluate: the phase loop of Algorithm 1, with logging and checkpoints.

Starting and resuming are one code path: the state is restored from the latest
checkpoint if there is one, the input streams are opened at its position, and the loop
runs whatever is left of the schedule.
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics
from jax.experimental import multihost_utils

from metapix_jax import checkpoints, evaluate, parallel, schedule
from metapix_jax import state as state_lib
from metapix_jax.data import labels, pipeline, sources, synthetic
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


def load_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    source_root, target_root = data_roots(config, workdir)
    d = config.data
    return Data(
        source=sources.gta5_pairs(source_root) if schedule.needs_source(config) else [],
        target_train=sources.cityscapes_pairs(target_root, d.target_train_split),
        target_eval=sources.cityscapes_pairs(target_root, d.target_eval_split),
    )


def train_stream(
    config: ml_collections.ConfigDict, pairs, domain: str, position: int
) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the endless `domain` stream, from batch `position` on."""
    d = config.data
    return pipeline.train_batches(
        pairs,
        labels.CITYSCAPES_ID_TO_TRAIN_ID,
        batch_size=d.source_batch if domain == "source" else d.target_batch,
        size=(d.height, d.width),
        seed=config.seed + (0 if domain == "source" else 1),
        flip=d.target_flip and domain == "target",
        normalization=d.normalization,
        start_step=position,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_threads=d.num_threads,
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
    if phase.kind == "meta" and config.meta.reinit_per_generation and phase.generation > 1:
        key = state_lib.unet_key(jax.random.PRNGKey(config.seed), phase.generation - 1)
        unet_params = state_lib.init_weighting_params(config, key)
        state = state.replace(
            unet_params=unet_params,
            unet_opt_state=state_lib.weighting_optimizer(config).init(unet_params),
        )
    if phase.kind == "weighted" and config.optim.fresh_weighted_optimizer:
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


def check_finite(values: dict[str, float], phase: schedule.Phase, position: int) -> None:
    """Stops the run on a non-finite loss: the last checkpoint stays the good one."""
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"non-finite {bad} at position {position} (phase {phase.name}); "
            "the last checkpoint was saved before this interval and is intact"
        )


def to_uint8_image(image: np.ndarray, normalization: str) -> np.ndarray:
    """Undoes the input normalisation of one image for display."""
    if normalization == "caffe":
        rgb = (image + np.array(pipeline.CAFFE_MEAN_BGR))[..., ::-1]
    else:
        rgb = (image * np.array(pipeline.IMAGENET_STD) + np.array(pipeline.IMAGENET_MEAN)) * 255
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
        if phase.kind in ("meta", "weighted"):
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
        **evaluate.summarize(confusion, labels.CLASS_NAMES),
    }
    scalars = {"eval/miou": result["miou"]}
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


def restore_or_init(config, manager, mesh) -> TrainState:
    """The latest checkpoint's state, or a fresh one; replicated over the mesh."""
    fresh = state_lib.init_state(config)
    restored = checkpoints.restore(manager, fresh)
    return parallel.put_replicated(restored if restored is not None else fresh, mesh)


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
) -> TrainState:
    """Runs the phase's remaining steps, logging and checkpointing along the way."""
    step_fn = getattr(steps, phase.kind)
    collection = None
    first = int(state.position)
    for position in range(first, phase.end):
        batch = parallel.to_global(next(batches), mesh)
        state, step_metrics = step_fn(state, batch)
        new_position = position + 1
        if position == first:
            jax.block_until_ready(state.position)
            progress.restart(new_position)  # Do not count the compilation.
        merged = metrics_collection(tuple(sorted(step_metrics)))
        merged = merged.single_from_model_output(**step_metrics)
        collection = merged if collection is None else collection.merge(merged)
        if new_position % config.log_every == 0 or new_position == phase.end:
            summary = {k: float(v) for k, v in collection.compute().items()}
            check_finite(summary, phase, new_position)
            rate = progress.update(phase.kind, new_position)
            scalars = {f"{phase.kind}/{k}": v for k, v in summary.items()}
            scalars[f"{phase.kind}/steps_per_sec"] = rate
            scalars["learning_rate"] = learning_rate(config, phase, int(state.step))
            writer.write_scalars(new_position, scalars)
            eta = format_seconds(progress.eta_seconds(new_position))
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items()))
            print(
                f"[{config.method}] {phase.name} {new_position - phase.start}/{phase.length} "
                f"(position {new_position}/{phase_total(progress)}) {shown} "
                f"{rate:.2f} steps/s ETA {eta}",
                flush=True,
            )
            collection = None
        if config.image_every and new_position % config.image_every == 0:
            writer.write_images(new_position, image_summaries(state, steps, batch, config, phase))
        if config.checkpoint_every and new_position % config.checkpoint_every == 0:
            checkpoints.save(manager, state)
            progress.restart(new_position)
    return state


def phase_total(progress: Progress) -> int:
    return progress.plan[-1].end if progress.plan else 0


def learning_rate(config, phase: schedule.Phase, segmenter_step: int) -> float:
    """The segmenter's lr at a step, for the logs (mirrors state.segmenter_optimizer)."""
    o = config.optim
    if phase.kind == "weighted" and o.fresh_weighted_optimizer:
        horizon, base = config.schedule.weighted_steps, o.weighted_learning_rate
        segmenter_step -= config.schedule.joint_steps + (phase.generation - 1) * horizon
    else:
        horizon, base = state_lib.total_segmenter_steps(config), o.learning_rate
    fraction = min(max(segmenter_step, 0), horizon) / max(horizon, 1)
    return base * (1 - fraction) ** o.poly_power


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the configured method's schedule; returns the final evaluation."""
    parallel.initialize_distributed(config)  # Before anything touches a device.
    os.makedirs(workdir, exist_ok=True)
    plan = schedule.phases(config)
    parallel.check_batch_sizes(config)
    data = load_data(config, workdir)
    mesh = parallel.make_mesh()
    steps = parallel.make_steps(config, mesh)
    manager = checkpoints.make_manager(workdir, [p.end for p in plan], config.keep_periodic)
    state = restore_or_init(config, manager, mesh)
    save_config(config, workdir)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    position = int(state.position)
    if position:
        print(f"[{config.method}] resuming at position {position}", flush=True)
    progress = Progress(plan)
    batches = Batches(config, data, position)
    result = None
    with metric_writers.ensure_flushes(writer):
        for phase in plan:
            if int(state.position) >= phase.end:
                continue
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
            )
            checkpoints.save(manager, state)
            if config.eval_at_phase_end or phase is plan[-1]:
                result = run_evaluation(state, steps, data, config, mesh, workdir, writer)
                progress.restart(int(state.position))
        if result is None:  # Nothing left to train: evaluate what the checkpoint holds.
            result = run_evaluation(state, steps, data, config, mesh, workdir, writer)
    manager.close()
    return result


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
    state = checkpoints.restore(manager, state_lib.init_state(config), position)
    state = parallel.put_replicated(state, mesh)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    with metric_writers.ensure_flushes(writer):
        result = run_evaluation(state, steps, data, config, mesh, workdir, writer)
    manager.close()
    return result
