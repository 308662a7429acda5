"""Config checks that run before anything is compiled or written.

A wrong value should cost a second and one line naming the field and what it may be,
not a traceback from inside a JAX trace ten minutes in. `validate` collects every
problem at once; `check_config_unchanged` refuses to continue a run in a workdir that
was trained with different settings (the checkpoints would silently mix two runs).
"""

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from metapix_jax import (
    checkpoints,
    errors,
    losses,
    meta,
    methods,
    nonfinite,
    parallel,
    predict,
    schedule,
)
from metapix_jax import workdir as workdir_lib
from metapix_jax.data import labels, normalization, pipeline, sources, synthetic
from metapix_jax.models.unet import WEIGHTING_KINDS
from metapix_jax.state import DTYPES

MODES = ("train", "eval", "compare", "results", "predict")
FC6_PADDINGS = ("VALID", "SAME")
TARGET_FORMATS = ("folder", "tfds")  # data/datasets.target_examples
MAX_SPLIT_BLOCK = 5  # VGG-16 has five blocks.

ConfigError = errors.ConfigError


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


# Field -> check; the allowed values come from the modules that use them.
FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    "mode": one_of(MODES),
    "method": one_of(tuple(methods.METHODS)),
    "seed": int_at_least(0),
    "nonfinite": one_of(nonfinite.MODES),
    "distributed": one_of(parallel.DISTRIBUTED_MODES),
    "num_processes": int_at_least(-1),
    "process_id": int_at_least(-1),
    "heartbeat_timeout": int_at_least(1),
    "data.height": int_at_least(1),
    "data.width": int_at_least(1),
    "data.num_classes": _rule(
        lambda v: _integer(v) and v == labels.NUM_CLASSES,
        f"{labels.NUM_CLASSES}: the label maps, class names and evaluation are the "
        "Cityscapes train classes (data/labels.py)",
    ),
    "data.ignore_label": _rule(
        lambda v: _integer(v) and v == labels.IGNORE_LABEL,
        f"{labels.IGNORE_LABEL}: the label maps write it for unlabeled pixels (data/labels.py)",
    ),
    "data.source_batch": int_at_least(1),
    "data.target_batch": int_at_least(1),
    "data.eval_batch": int_at_least(1),
    "data.normalization": one_of(normalization.NORMALIZATIONS),
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
    "weighting.normalization": one_of(losses.WEIGHT_NORMALIZATIONS),
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
    "meta.inner_optimizer": one_of(meta.INNER_OPTIMIZERS),
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
    "predict.weights_for": one_of(predict.WEIGHTS_FOR),
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
    for field, check in FIELD_RULES.items():
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
        if config.method in methods.METHODS and schedule.total_positions(config) == 0:
            yield (
                "config.schedule: the schedule has no steps (joint_steps, generations x "
                "(meta_steps + weighted_steps) are all 0); give at least one phase a length"
            )
    if config.mode == "compare":
        for method in config.compare_methods:
            if method not in methods.METHODS and method not in methods.VARIANTS:
                yield (
                    f"config.compare_methods: {method!r} must be one of "
                    f"{tuple(methods.METHODS)} or a variant {tuple(methods.VARIANTS)}"
                )


def oracle_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """The oracle needs to know the harmful pixels: only the embedded benchmark does."""
    names = [config.method] if config.mode == "train" else []
    names += list(config.compare_methods) if config.mode == "compare" else []
    for name in names:
        method = methods.METHODS.get(methods.VARIANTS.get(name, (name,))[0])
        if method and method.source_without_harm and not config.data.synthetic:
            yield (
                f"config.method={name!r} needs the embedded benchmark (data.synthetic=True): "
                "only it knows which source pixels are harmful"
            )
        if method and method.source_without_harm and config.data.source_prepared:
            yield f"config.method={name!r} reads the source PNGs: leave data.source_prepared empty"


def needs_source(config: ml_collections.ConfigDict) -> bool:
    """Whether the mode reads source images: training a method that does, predict's weight
    maps; never evaluation."""
    if config.mode == "predict":
        return bool(config.predict.weights_for)
    names = list(config.compare_methods) if config.mode == "compare" else [config.method]
    resolved = [methods.VARIANTS.get(n, (n,))[0] for n in names]
    return config.mode != "eval" and any(
        methods.METHODS[n].reads_source for n in resolved if n in methods.METHODS
    )


def data_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """Real data needs its roots; the synthetic benchmark needs a valid label convention."""
    d = config.data
    if config.mode == "results" or (config.mode == "predict" and not config.predict.weights_for):
        return  # These modes read no dataset.
    if d.synthetic:
        yield from confusion_problems(d.synthetic_confusions)
        yield from synthetic.harm_problems(
            **{name: d[f"synthetic_{name}"] for name in synthetic.HARM_FIELDS}
        )
        return
    roots = [] if d.target_format == "tfds" else [("target_root", d.target_root)]
    if needs_source(config) and not d.source_prepared:
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


def predict_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """Predict mode needs something to segment or weight maps to draw."""
    p = config.predict
    if config.mode != "predict":
        return
    if not p.input and not p.weights_for:
        yield (
            "config.predict.input is empty: give a folder of images or a glob (or "
            "predict.weights_for='source' for weight maps alone)"
        )
    if p.input and not (p.color or p.overlay or p.train_ids or p.label_ids):
        yield (
            "config.predict: nothing to write; set predict.color, predict.label_ids, "
            "predict.train_ids or predict.overlay"
        )


def checkpoint_problems(config: ml_collections.ConfigDict, workdir: str) -> Iterator[str]:
    """Eval and predict need something to evaluate."""
    if config.mode not in ("eval", "predict"):
        return
    if not checkpoints.finished_positions(workdir):
        yield f"config.mode={config.mode!r}: {checkpoints.no_checkpoint_message(workdir)}"


def count_devices(config: ml_collections.ConfigDict, problems: list[str]) -> tuple[int, int]:
    """(devices, processes) of the run: joins a multi-process run first (parallel.py).

    Only here is the backend started; with a bad `distributed` field nothing is joined.
    """
    if any(p.startswith(("config.distributed", "config.num_processes")) for p in problems):
        return 1, 1
    import jax

    parallel.initialize_distributed(config)
    return jax.device_count(), jax.process_count()


def validate(config: ml_collections.ConfigDict, workdir: str, devices: int | None = None) -> None:
    """Raises ConfigError listing every problem (one line each), or returns.

    In train mode it also refuses a workdir trained with another config (see below).

    `devices` defaults to jax.device_count(), which starts the backend but compiles nothing.
    """
    problems = list(field_problems(config))
    problems += schedule_problems(config) if not problems else []
    devices, processes = count_devices(config, problems) if devices is None else (devices, 1)
    problems += parallel.batch_size_problems(config, devices, processes)
    problems += data_problems(config)
    problems += path_problems(config)
    problems += predict_problems(config)
    problems += oracle_problems(config)
    problems += checkpoint_problems(config, workdir)
    if problems:
        raise ConfigError("\n".join(problems))
    if config.mode == "train":  # Compare mode checks each method's workdir when it gets there.
        workdir_lib.check_config_unchanged(config, workdir)
