"""train_and_evaluate: Algorithm 1 as a loop over the method's phases, each a loop of steps.

Starting and resuming are one code path: the state is restored from the latest readable
checkpoint if there is one, the input streams are opened at its position (they are pure
functions of the seed and the position), and the loop runs what is left of the schedule.
What happens at a phase start (a fresh U-Net per generation, a fresh weighted-phase
optimiser) is re-applied when a run resumes exactly there.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
from clu import metric_writers
from jax.sharding import Mesh

from metapix_jax import (
    checkpoints,
    console,
    evaluate,
    faults,
    figures,
    methods,
    nonfinite,
    parallel,
    preemption,
    progress,
    schedule,
    steps,
    summaries,
)
from metapix_jax import state as state_lib
from metapix_jax import workdir as workdir_lib
from metapix_jax.data import datasets
from metapix_jax.preemption import InterruptFlag
from metapix_jax.state import TrainState


def begin_phase(
    state: TrainState, phase: schedule.Phase, config: ml_collections.ConfigDict
) -> TrainState:
    """What happens once at the start of a phase, before its first step (and on resume)."""
    if phase.spec.learns_weights and config.meta.reinit_per_generation and phase.generation > 1:
        unet_params, unet_opt_state = state_lib.fresh_weighting(config, phase.generation - 1)
        state = state.replace(unet_params=unet_params, unet_opt_state=unet_opt_state)
    if phase.spec.weighted_optimizer and config.optim.fresh_weighted_optimizer:
        tx = state_lib.segmenter_optimizer(config, weighted_phase=True)
        state = state.replace(opt_state=tx.init(state.params))
    return state


@dataclasses.dataclass
class Run:
    """What the phases of one training run share; set up once by `start_run`."""

    config: ml_collections.ConfigDict
    workdir: str
    plan: list[schedule.Phase]
    mesh: Mesh
    steps: dict[str, Callable]
    inference: steps.Inference
    data: datasets.Datasets
    batches: Iterator[steps.Batch]
    manager: checkpoints.ocp.CheckpointManager
    writer: metric_writers.MetricWriter
    progress: progress.Progress
    checker: nonfinite.Checker
    interrupt: InterruptFlag
    shown: figures.Examples | None  # The fixed examples of the TensorBoard images.
    interval: object = None  # The clu Collection of the current logging interval.
    compiled: set[str] = dataclasses.field(default_factory=set)  # Step kinds compiled so far.

    def save(self, state: TrainState, phase: schedule.Phase) -> None:
        """Saves after making sure no step since the last check was non-finite."""
        self.checker.check(phase, self.manager.latest_step())
        checkpoints.save(self.manager, state)

    def evaluate(self, state: TrainState) -> dict:
        result = evaluate.run_evaluation(
            state, self.inference.confusion, self.data, self.mesh, self.workdir, self.writer
        )
        self.progress.restart(int(state.position))  # An evaluation is not a step.
        return result


def restore_or_initialise(config, manager, mesh: Mesh, total: int) -> TrainState:
    """The latest readable checkpoint's state, or a fresh one, replicated over the mesh."""
    if manager.latest_step() is not None:
        console.say(config.method, f"restoring the latest checkpoint in {manager.directory}")
        faults.at_startup("restore")
    restored = checkpoints.restore_latest_readable(manager, parallel.state_template(config, mesh))
    if restored is None:
        console.say(config.method, "initialising the networks")
        faults.at_startup("initialise")
        return parallel.put_replicated(state_lib.init_state(config), mesh)
    console.say(config.method, f"continuing from position {int(restored.position)} of {total}")
    return parallel.put_replicated(restored, mesh)


def start_run(config: ml_collections.ConfigDict, workdir: str, interrupt: InterruptFlag):
    """Sets up a run and restores its state: (Run, state at the position to go on from)."""
    workdir_lib.check_config_unchanged(config, workdir)  # Again: library callers skip main.
    plan = schedule.phases(config)
    method = methods.METHODS[config.method]
    data = datasets.get_datasets(
        config, workdir, with_source=method.reads_source, without_harm=method.source_without_harm
    )
    mesh = parallel.make_mesh()
    manager = checkpoints.make_manager(
        workdir, [p.end for p in plan], config.keep_periodic, cleanup=True
    )
    state = restore_or_initialise(config, manager, mesh, plan[-1].end)
    workdir_lib.save_config(config, workdir)
    run = Run(
        config=config,
        workdir=workdir,
        plan=plan,
        mesh=mesh,
        steps=faults.wrap_steps(methods.compile_steps(config, mesh, {p.kind for p in plan})),
        inference=steps.make_inference(config, mesh),
        data=data,
        batches=data.train_batches(int(state.position)),
        manager=manager,
        writer=metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0, asynchronous=False
        ),
        progress=progress.Progress(plan),
        checker=nonfinite.Checker(config.nonfinite, plan[-1].end),
        interrupt=interrupt,
        shown=figures.fixed_examples(data) if config.image_every else None,
    )
    return run, state


def stop_if_interrupted(run: Run, state: TrainState, phase: schedule.Phase, position: int) -> None:
    """At the step boundary `position` (counted on the host: asking the state would wait for
    the device), once a signal says stop here (preemption.py): save, then raise Interrupted.
    Several processes stop at the same position, which may come a few steps after the signal.
    """
    if not run.interrupt.reached(position):
        return
    run.save(state, phase)
    raise run.interrupt.interruption(
        f"position {position} of {run.progress.total} (phase {phase.name})"
    )


def log_interval(run: Run, state: TrainState, phase: schedule.Phase, position: int) -> None:
    """Writes the interval's averages and the lr, and prints a progress line."""
    summary = {k: float(v) for k, v in run.interval.compute().items()} if run.interval else {}
    run.interval = None
    skipped = run.checker.check(phase, run.manager.latest_step())
    if skipped:
        summary[nonfinite.FLAG] = skipped  # Steps skipped in this interval.
    rate = run.progress.update(phase.kind, position)
    lr = state_lib.learning_rate(run.config, state.opt_state, phase.spec.weighted_optimizer)
    scalars = {f"{phase.kind}/{k}": v for k, v in summary.items()}
    scalars.update({f"{phase.kind}/steps_per_sec": rate, "learning_rate": float(lr)})
    run.writer.write_scalars(position, scalars)
    eta = progress.format_seconds(run.progress.eta_seconds(position))
    line = progress.progress_line(phase, position, summary, rate, eta)
    console.say(run.config.method, line)


def after_step(run: Run, state: TrainState, phase: schedule.Phase, position: int, step_metrics):
    """The periodic actions after the step to `position`: logs, images, saves, signals."""
    config = run.config
    run.checker.record(position, step_metrics)
    run.interval = summaries.merge_step_metrics(run.interval, step_metrics)
    if position % config.log_every == 0 or position == phase.end:
        log_interval(run, state, phase, position)
    if config.image_every and position % config.image_every == 0:
        images = figures.image_summaries(
            state,
            run.inference,
            run.shown,
            run.mesh,
            config.data.normalization,
            phase.spec.shows_weights,
        )
        run.writer.write_images(position, images)
    if config.checkpoint_every and position % config.checkpoint_every == 0:
        run.save(state, phase)
        run.progress.restart(position)
    stop_if_interrupted(run, state, phase, position)


def first_step(run: Run, state: TrainState, phase: schedule.Phase, position: int) -> None:
    """Waits for a phase's first step, so that its compilation is timed apart from the steps."""
    jax.block_until_ready(state.position)
    if phase.kind not in run.compiled:
        run.compiled.add(phase.kind)
        seconds = time.perf_counter() - run.progress.mark[1]
        console.say(run.config.method, f"{phase.kind} step compiled and run ({seconds:.1f} s)")
    run.progress.restart(position)  # Do not count the compilation.


def run_phase(state: TrainState, phase: schedule.Phase, run: Run) -> TrainState:
    """The phase's remaining steps, each followed by the periodic actions.

    The host counts positions itself, so that it never waits for a step to finish
    (except once, to time the first step apart from its compilation).
    """
    step = run.steps[phase.kind]
    first = int(state.position)
    if phase.kind not in run.compiled:
        console.say(run.config.method, f"{phase.name}: compiling the {phase.kind} step")
    run.progress.restart(first)
    for position in range(first + 1, phase.end + 1):  # The position after each step.
        batch = parallel.to_global(next(run.batches), run.mesh)
        state, step_metrics = step(state, batch)
        if position == first + 1:
            first_step(run, state, phase, position)
        after_step(run, state, phase, position, step_metrics)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the configured method's schedule; returns the final evaluation.

    SIGTERM/SIGINT end it with Interrupted after a checkpoint at the next step boundary
    (several processes: at the position they agree on, preemption.py);
    a non-finite step ends it with NonFiniteError (config.nonfinite='stop').
    """
    parallel.initialize_distributed(config)  # Before anything touches a device.
    # main.py's flag (installed before anything slow), or one of our own for a library caller.
    with preemption.handling_signals() as interrupt:
        run, state = start_run(config, workdir, interrupt)
        result = None
        with metric_writers.ensure_flushes(run.writer), interrupt.at_step_boundaries():
            for phase in run.plan:  # Algorithm 1: the phases in order.
                changed = phase.spec.changes_segmenter  # A meta phase leaves the mIoU as it was.
                evaluates = (config.eval_at_phase_end and changed) or phase is run.plan[-1]
                if int(state.position) >= phase.end:
                    # Its evaluation is part of a phase: one a kill interrupted is redone.
                    redo = int(state.position) == phase.end and evaluates
                    if redo and not os.path.exists(evaluate.result_path(workdir, phase.end)):
                        result = run.evaluate(state)
                    continue
                stop_if_interrupted(run, state, phase, int(state.position))
                if int(state.position) == phase.start:
                    state = parallel.put_replicated(begin_phase(state, phase, config), run.mesh)
                state = run_phase(state, phase, run)
                run.save(state, phase)
                if evaluates:
                    result = run.evaluate(state)
            if result is None:  # Nothing left to train: evaluate what the checkpoint holds.
                result = run.evaluate(state)
        run.manager.close()
    if run.checker.skipped:
        console.say(
            config.method,
            f"skipped {run.checker.skipped} steps with a non-finite loss or gradient "
            "(config.nonfinite='skip')",
        )
    speeds = dict(run.progress.seconds_per_step)  # For compare mode's ETA.
    return {**result, "nonfinite_skipped": run.checker.skipped, "seconds_per_step": speeds}
