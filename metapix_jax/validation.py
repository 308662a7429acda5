"""Config checks that run before anything is compiled or written.

A wrong value should cost a second and one line naming the field and what it may be,
not a traceback from inside a JAX trace ten minutes in. `validate` collects every
problem at once; `check_config_unchanged` refuses to continue a run in a workdir that
was trained with different settings (the checkpoints would silently mix two runs).
"""

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from metapix_jax import checkpoints, losses, schedule
from metapix_jax.data import labels, pipeline, sources, synthetic
from metapix_jax.state import DTYPES

MODES = ("train", "eval", "compare", "results", "predict")
WEIGHTING_KINDS = ("w1", "w19")  # models/unet.py
INNER_OPTIMIZERS = ("sgd", "adam")  # state.inner_optimizer
FC6_PADDINGS = ("VALID", "SAME")
NONFINITE_MODES = ("stop", "skip")
TARGET_FORMATS = ("folder", "tfds")  # train.target_examples
DISTRIBUTED_MODES = ("auto", "on", "off")  # parallel.initialize_distributed
MAX_SPLIT_BLOCK = 5  # VGG-16 has five blocks.

# Fields that may change between runs in one workdir: they do not change the trajectory
# (what is logged, saved or evaluated, where the data lives, how fast it is decoded).
EXEMPT_FIELDS = (
    "mode",
    "log_every",
    "image_every",
    "checkpoint_every",
    "keep_periodic",
    "eval_at_phase_end",
    "eval_checkpoint",
    "compare_methods",
    "allow_config_change",
    "nonfinite",
    "data.source_root",
    "data.target_root",
    "data.synthetic_root",
    "data.num_threads",
    "data.num_workers",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "data.eval_batch",
    "data.target_eval_split",
)
EXEMPT_PREFIXES = ("predict",)  # Any field of a prediction mode.


class ConfigError(ValueError):
    """A config value is not allowed; the message names the field and what it may be."""


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(ok: Callable[[Any], bool], allowed: str) -> Callable[[Any], str | None]:
    """A check that returns None or 'must be <allowed>'."""
    return lambda value: None if ok(value) else f"must be {allowed}"


def one_of(choices) -> Callable[[Any], str | None]:
    return _rule(lambda v: v in choices, f"one of {tuple(choices)}")


def int_at_least(low: int) -> Callable[[Any], str | None]:
    return _rule(lambda v: _integer(v) and v >= low, f"an integer >= {low}")


def int_in(low: int, high: int) -> Callable[[Any], str | None]:
    return _rule(lambda v: _integer(v) and low <= v <= high, f"an integer in {low}..{high}")


def positive() -> Callable[[Any], str | None]:
    return _rule(lambda v: _number(v) and v > 0, "a finite number > 0")


def non_negative() -> Callable[[Any], str | None]:
    return _rule(lambda v: _number(v) and v >= 0, "a finite number >= 0")


def fraction(closed_top: bool) -> Callable[[Any], str | None]:
    top = "1]" if closed_top else "1)"
    return _rule(
        lambda v: _number(v) and 0 <= v and (v <= 1 if closed_top else v < 1), f"in [0, {top}"
    )


def field_rules() -> dict[str, Callable[[Any], str | None]]:
    """Field -> check. Methods come from schedule.METHODS, which other modules extend."""
    return {
        "mode": one_of(MODES),
        "method": one_of(schedule.METHODS),
        "seed": int_at_least(0),
        "nonfinite": one_of(NONFINITE_MODES),
        "distributed": one_of(DISTRIBUTED_MODES),
        "num_processes": int_at_least(-1),
        "process_id": int_at_least(-1),
        "data.height": int_at_least(1),
        "data.width": int_at_least(1),
        "data.num_classes": int_at_least(1),
        "data.ignore_label": int_in(0, 255),
        "data.source_batch": int_at_least(1),
        "data.target_batch": int_at_least(1),
        "data.eval_batch": int_at_least(1),
        "data.normalization": one_of(pipeline.NORMALIZATIONS),
        "data.num_threads": int_at_least(1),
        "data.num_workers": int_at_least(0),
        "data.source_kind": one_of(sources.SOURCE_KINDS),
        "data.eval_protocol": one_of(pipeline.EVAL_PROTOCOLS),
        "data.target_format": one_of(TARGET_FORMATS),
        "data.synthetic_seed": int_at_least(0),
        "data.synthetic_num_source": int_at_least(1),
        "data.synthetic_num_target_train": int_at_least(1),
        "data.synthetic_num_target_val": int_at_least(1),
        "data.synthetic_gap": non_negative(),
        "data.synthetic_harm_rate": fraction(closed_top=True),
        "model.width": positive(),
        "model.fc_dim": int_at_least(1),
        "model.fc6_kernel": int_at_least(1),
        "model.fc6_padding": one_of(FC6_PADDINGS),
        "model.split_block": int_in(0, MAX_SPLIT_BLOCK),
        "model.dropout": fraction(closed_top=False),
        "model.dtype": one_of(tuple(DTYPES)),
        "weighting.kind": one_of(WEIGHTING_KINDS),
        "weighting.base_channels": int_at_least(1),
        "weighting.depth": int_at_least(1),
        "weighting.init_std": non_negative(),
        "schedule.joint_steps": int_at_least(0),
        "schedule.meta_steps": int_at_least(0),
        "schedule.weighted_steps": int_at_least(0),
        "schedule.generations": int_at_least(0),
        "optim.learning_rate": positive(),
        "optim.b1": fraction(closed_top=False),
        "optim.b2": fraction(closed_top=False),
        "optim.eps": positive(),
        "optim.poly_power": non_negative(),
        "optim.bias_lr_mult": positive(),
        "optim.weight_decay": non_negative(),
        "optim.weighted_learning_rate": positive(),
        "meta.inner_optimizer": one_of(INNER_OPTIMIZERS),
        "meta.inner_learning_rate": positive(),
        "meta.learning_rate": positive(),
        "meta.b1": fraction(closed_top=False),
        "meta.b2": fraction(closed_top=False),
        "meta.eps": positive(),
        "meta.weight_decay": non_negative(),
        "loss.source_normalization": one_of(losses.NORMALIZATIONS),
        "loss.target_normalization": one_of(losses.NORMALIZATIONS),
        "loss.kind": one_of(losses.LOSS_KINDS),
        "loss.focal_gamma": non_negative(),
        "fda.beta": _rule(lambda v: _number(v) and 0 <= v <= 0.5, "in [0, 0.5]"),
        "minent.weight": non_negative(),
        "predict.overlay": fraction(closed_top=True),
        "predict.weights_for": one_of(("", "source")),
        "predict.num_weight_images": int_at_least(1),
        "log_every": int_at_least(1),
        "image_every": int_at_least(0),
        "checkpoint_every": int_at_least(0),
        "keep_periodic": int_at_least(1),
        "eval_checkpoint": int_at_least(-1),
    }


def lookup(config: ml_collections.ConfigDict, field: str) -> Any:
    """config['a.b'] for a dotted field name."""
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def field_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """'config.<field>=<value> must be ...' for every field that breaks its rule."""
    for field, check in field_rules().items():
        try:
            value = lookup(config, field)
        except (KeyError, AttributeError):
            continue  # A config without the field (e.g. built by another module).
        problem = check(value)
        if problem:
            yield f"config.{field}={value!r} {problem}"


def schedule_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """An empty schedule, or a method with nothing to compare."""
    s = config.schedule
    lengths = (s.joint_steps, s.meta_steps, s.weighted_steps, s.generations)
    if config.mode in ("train", "compare") and all(_integer(n) and n >= 0 for n in lengths):
        if config.method in schedule.METHODS and schedule.total_positions(config) == 0:
            yield (
                "config.schedule: the schedule has no steps (joint_steps, generations x "
                "(meta_steps + weighted_steps) are all 0); give at least one phase a length"
            )
    if config.mode == "compare":
        for method in config.compare_methods:
            if method not in schedule.METHODS and method not in schedule.VARIANTS:
                yield (
                    f"config.compare_methods: {method!r} must be one of {schedule.METHODS} "
                    f"or a variant {tuple(schedule.VARIANTS)}"
                )


def device_problems(config: ml_collections.ConfigDict, devices: int) -> Iterator[str]:
    """Every global batch splits evenly over the devices."""
    for field in ("source_batch", "target_batch", "eval_batch"):
        size = config.data[field]
        if _integer(size) and size > 0 and size % devices:
            yield f"config.data.{field}={size} must be a multiple of the {devices} devices"


def data_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """Real data needs its roots; the synthetic benchmark needs a valid label convention."""
    d = config.data
    if config.mode == "results" or (config.mode == "predict" and not config.predict.weights_for):
        return  # These modes read no dataset.
    if d.synthetic:
        yield from confusion_problems(d.synthetic_confusions)
        return
    roots = [] if d.target_format == "tfds" else [("target_root", d.target_root)]
    needs_source = config.method in schedule.METHODS and schedule.needs_source(config)
    if needs_source and not d.source_prepared:
        roots.insert(0, ("source_root", d.source_root))
    for field, root in roots:
        if not root:
            yield f"config.data.{field} is empty: give the dataset folder (or data.synthetic=True)"
        elif not os.path.isdir(root):
            yield f"config.data.{field}={root!r} is not a directory"


def path_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """Optional files and folders that, when given, must exist."""
    d = config.data
    given = [
        ("data.source_list", d.source_list, os.path.isfile),
        ("data.target_train_list", d.target_train_list, os.path.isfile),
        ("data.target_eval_list", d.target_eval_list, os.path.isfile),
        ("data.source_prepared", d.source_prepared, os.path.isdir),
        ("data.tfds_data_dir", d.tfds_data_dir, os.path.isdir),
        ("init.vgg16", config.init.vgg16, os.path.isfile),
    ]
    for field, path, exists in given:
        if path and not exists(path):
            kind = "file" if exists is os.path.isfile else "directory"
            yield f"config.{field}={path!r} must be an existing {kind}"


def confusion_problems(text: Any) -> Iterator[str]:
    """The benchmark's label convention: 'class>class' pairs of known class names or '*'."""
    field = f"config.data.synthetic_confusions={text!r}"
    try:
        pairs = synthetic.parse_confusions(text)
    except (ValueError, AttributeError):
        yield f"{field} must look like 'sidewalk>road,car>truck' ('' = no confusion)"
        return
    names = (*labels.CLASS_NAMES, "*")
    for source, written in pairs.items():
        if source not in names or written not in names:
            yield f"{field}: {source!r}>{written!r} must name classes of {names}"


def checkpoint_problems(config: ml_collections.ConfigDict, workdir: str) -> Iterator[str]:
    """Eval and predict need something to evaluate."""
    if config.mode not in ("eval", "predict"):
        return
    folder = checkpoints.checkpoint_dir(workdir)
    if not checkpoints.finished_positions(workdir):
        yield (
            f"config.mode={config.mode!r}: no checkpoint in {folder}: train first (mode=train) or "
            "point --workdir at a trained run"
        )


def count_devices(config: ml_collections.ConfigDict, problems: list[str]) -> int:
    """All devices of all processes: joins a multi-process run first (parallel.py).

    Only here is the backend started; with a bad `distributed` field nothing is joined.
    """
    if any(p.startswith(("config.distributed", "config.num_processes")) for p in problems):
        return 1
    import jax

    from metapix_jax import parallel

    parallel.initialize_distributed(config)
    return jax.device_count()


def validate(config: ml_collections.ConfigDict, workdir: str, devices: int | None = None) -> None:
    """Raises ConfigError listing every problem (one line each), or returns.

    In train mode it also refuses a workdir trained with another config (see below).

    `devices` defaults to jax.device_count(), which starts the backend but compiles nothing.
    """
    problems = list(field_problems(config))
    problems += schedule_problems(config) if not problems else []
    if devices is None:
        devices = count_devices(config, problems)
    problems += device_problems(config, devices)
    problems += data_problems(config)
    problems += path_problems(config)
    problems += checkpoint_problems(config, workdir)
    if problems:
        raise ConfigError("\n".join(problems))
    if config.mode == "train":  # Compare mode checks each method's workdir when it gets there.
        check_config_unchanged(config, workdir)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (as JSON gives them back)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def exempt(field: str) -> bool:
    return field in EXEMPT_FIELDS or field.split(".")[-1].startswith(EXEMPT_PREFIXES)


def config_as_saved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (tuples become lists), flattened."""
    return flatten(json.loads(config.to_json_best_effort()))


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: old -> new' for every non-exempt field that differs."""
    changes = []
    for field in sorted(set(saved) | set(current)):
        if exempt(field):
            continue
        old, new = saved.get(field, "<absent>"), current.get(field, "<absent>")
        if old != new:
            changes.append(f"{field}: {old!r} -> {new!r}")
    return changes


def check_config_unchanged(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Refuses a workdir whose config.json differs in a field that changes training.

    Returns the changes that were allowed (config.allow_config_change), to be reported.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            saved = flatten(json.load(f))
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); move it away to start over") from e
    changes = config_changes(saved, config_as_saved(config))
    if changes and not config.get("allow_config_change", False):
        raise ConfigError(
            f"workdir {workdir} was trained with a different config ({path}): "
            + "; ".join(changes)
            + ". Use a new --workdir, or pass --config.allow_config_change=True to go on "
            "from its checkpoints with the new values"
        )
    return changes
