"""Config checks that run before anything is compiled or written.

A wrong value should cost a second and one line naming the field and what it may be,
not a traceback from inside a JAX trace ten minutes in. `validate` collects every
problem at once; `check_config_unchanged` refuses to continue a run in a workdir that
was trained with different settings (the checkpoints would silently mix two runs).

Every field of configs/default.py is checked for its kind first (`kind_problems`: the
type of its default; floats finite, integers within int64), so a field added later is
covered without a rule of its own; FIELD_RULES then say which values of that kind make
sense, and the checks after them relate fields to each other, including the shapes the
two networks can take (`network_problems`).
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
from metapix_jax.models import pretrained
from metapix_jax.models.fcn8s import VGG16_BLOCKS
from metapix_jax.models.unet import WEIGHTING_KINDS
from metapix_jax.state import DTYPES

MODES = ("train", "eval", "compare", "results", "predict")
FC6_PADDINGS = ("VALID", "SAME")
TARGET_FORMATS = ("folder", "tfds")  # data/datasets.target_examples
MAX_SPLIT_BLOCK = 5  # VGG-16 has five blocks.
FCN_STRIDE = 2 ** len(VGG16_BLOCKS)  # pool5 is the image / 32 (each pool rounds up).
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits: 2**32 would give seed 0's key.
MAX_POSITIONS = 2**31 - 1  # The schedule position is an int32 in the state.
MAX_SIDE = 16384  # Image side: beyond it one image's activations fit no accelerator.
MAX_GENERATIONS = 10_000  # The phases are listed one by one; more is surely a typo.
INT64 = (-(2**63), 2**63 - 1)  # JSON, NumPy and JAX hold config integers as int64 at most.

ConfigError = errors.ConfigError


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(ok: Callable[[Any], bool], allowed: str) -> Callable[[Any], str | None]:
    """A check that returns None or 'must be <allowed>'."""
    return lambda value: None if ok(value) else f"must be {allowed}"


def _kind(default: Any) -> tuple[Callable[[Any], bool], str]:
    """(check, 'what it must be') for a field whose default is `default`."""
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "True or False"
    if isinstance(default, int):
        low, high = INT64
        return (lambda v: _integer(v) and low <= v <= high), "an integer (int64)"
    if isinstance(default, float):
        return _number, "a finite number"
    if isinstance(default, str):
        return (lambda v: isinstance(v, str)), "a string"
    if isinstance(default, tuple):
        return (lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v)), (
            "a tuple of strings"
        )
    return (lambda v: True), "anything"


def default_values() -> dict[str, Any]:
    """Every field of configs/default.py ('group.name') and its default value."""
    config = workdir_lib.default_config()
    out: dict[str, Any] = {}

    def walk(node: ml_collections.ConfigDict, prefix: str) -> None:
        for key in node.keys():
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(config, "")
    return out


def one_of(choices) -> Callable[[Any], str | None]:
    return _rule(lambda v: v in choices, f"one of {tuple(choices)}")


def int_at_least(low: int) -> Callable[[Any], str | None]:
    return _rule(lambda v: _integer(v) and v >= low, f"an integer >= {low}")


def int_in(low: int, high: int) -> Callable[[Any], str | None]:
    return _rule(lambda v: _integer(v) and low <= v <= high, f"an integer in {low}..{high}")


def processes() -> Callable[[Any], str | None]:
    return _rule(
        lambda v: _integer(v) and (v == -1 or v >= 1),
        "an integer >= 1, or -1 (from the environment or the cluster)",
    )


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
    "seed": _rule(
        lambda v: _integer(v) and 0 <= v <= MAX_SEED,
        f"an integer in 0..{MAX_SEED} (JAX's random keys keep 32 bits)",
    ),
    "nonfinite": one_of(nonfinite.MODES),
    "distributed": one_of(parallel.DISTRIBUTED_MODES),
    "num_processes": processes(),
    "process_id": int_at_least(-1),
    "heartbeat_timeout": int_at_least(1),
    "data.height": int_in(1, MAX_SIDE),
    "data.width": int_in(1, MAX_SIDE),
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
    "model.width": _rule(lambda v: _number(v) and 0 < v <= 64, "a finite number in (0, 64]"),
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
    "schedule.generations": int_in(0, MAX_GENERATIONS),
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


def shown(value: Any) -> str:
    """A value as one line: a dict set where a value belongs is a ConfigDict (YAML repr)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return repr(value)


def kind_problems(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{field: 'config.<field>=<value> must be <kind>'} for every field of
    configs/default.py whose value is not of its default's kind (NaN and inf included)."""
    problems = {}
    for field, default in default_values().items():
        try:
            value = lookup(config, field)
        except (KeyError, AttributeError):
            continue  # A config without the field (e.g. built by another module).
        ok, kind = _kind(default)
        if not ok(value):
            problems[field] = f"config.{field}={shown(value)} must be {kind}"
    return problems


def field_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """'config.<field>=<value> must be ...' for every field that breaks its kind or rule
    (one line per field: a value of the wrong kind is not checked against the rule)."""
    wrong_kind = kind_problems(config)
    yield from wrong_kind.values()
    for field, check in FIELD_RULES.items():
        if field in wrong_kind:
            continue
        try:
            value = lookup(config, field)
        except (KeyError, AttributeError):
            continue  # A config without the field (e.g. built by another module).
        problem = check(value)
        if problem:
            yield f"config.{field}={shown(value)} {problem}"
    yield from process_problems(config)


def process_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """A process index must name one of the processes."""
    count, index = config.get("num_processes", -1), config.get("process_id", -1)
    if _integer(count) and _integer(index) and count >= 1 and index >= count:
        yield (
            f"config.process_id={index} must be below config.num_processes={count} "
            f"(processes are numbered 0..{count - 1})"
        )


def _pooled(size: int, times: int) -> int:
    """A side after `times` 2x2/2 max-pools with ceil mode (models/fcn8s.max_pool_ceil)."""
    for _ in range(min(times, 64)):  # 64 halvings take any int64 side to 1.
        size = -(-size // 2)
    return size


def network_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """Image sizes the two networks cannot take (worked out from models/, tested there).

    FCN-8s pools five times with ceil mode (any side works: pool5 is ceil(side / 32)),
    then fc6: with 'VALID' padding its k x k kernel needs pool5 >= k on both sides, or it
    has nothing to convolve (the decoder then resizes an empty map: an IndexError).
    The U-Net pools the image weighting.depth times; the instance norm of its deepest
    level needs more than one pixel (of one pixel it makes a constant 0: the bottleneck
    would carry nothing), so ceil(H / 2^depth) * ceil(W / 2^depth) >= 2.
    """
    d, m, w = config.data, config.model, config.weighting
    height, width = d.height, d.width
    if not all(_integer(side) and 1 <= side <= MAX_SIDE for side in (height, width)):
        return  # Their own rule reports them.
    if m.fc6_padding == "VALID" and _integer(m.fc6_kernel):
        pool5 = (_pooled(height, len(VGG16_BLOCKS)), _pooled(width, len(VGG16_BLOCKS)))
        if min(pool5) < m.fc6_kernel:
            need = FCN_STRIDE * (m.fc6_kernel - 1) + 1
            yield (
                f"config.data.height={height} x config.data.width={width} is too small for "
                f"config.model.fc6_kernel={m.fc6_kernel} with fc6_padding='VALID': pool5 is "
                f"{pool5[0]} x {pool5[1]} (image / {FCN_STRIDE}, rounded up), the kernel needs "
                f"{m.fc6_kernel} x {m.fc6_kernel}; use sides >= {need}, a smaller fc6_kernel "
                "or fc6_padding='SAME'"
            )
    if _integer(w.depth) and w.depth >= 1:
        deepest = (_pooled(height, w.depth), _pooled(width, w.depth))
        if deepest[0] * deepest[1] < 2:
            yield (
                f"config.weighting.depth={w.depth} is too deep for config.data.height={height} "
                f"x config.data.width={width}: its deepest level would be "
                f"{deepest[0]} x {deepest[1]} pixel (the instance norm of one pixel is 0); "
                "use a smaller depth or larger images"
            )


def schedule_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """An empty schedule, or a method with nothing to compare."""
    s = config.schedule
    lengths = (s.joint_steps, s.meta_steps, s.weighted_steps, s.generations)
    if not all(_integer(n) and n >= 0 for n in lengths) or s.generations > MAX_GENERATIONS:
        return
    longest = s.joint_steps + s.generations * (s.meta_steps + s.weighted_steps)
    if longest > MAX_POSITIONS:
        yield (
            f"config.schedule: {longest} positions in all (joint_steps + generations x "
            f"(meta_steps + weighted_steps)); at most {MAX_POSITIONS} (the position is an int32)"
        )
        return
    if config.mode in ("train", "compare"):
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
    vgg16 = config.init.vgg16
    if vgg16 and os.path.isfile(vgg16) and config.mode in ("train", "compare"):
        try:
            pretrained.check_file(vgg16)
        except (pretrained.WeightFileError, OSError) as e:
            yield f"config.init.vgg16={vgg16!r}: {e}"
        if config.model.width != 1.0:
            yield (
                f"config.init.vgg16 needs config.model.width=1.0 (the real VGG-16 channels), "
                f"got {config.model.width!r}"
            )


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
    """Eval and predict need something to evaluate: the checkpoint asked for, if any."""
    if config.mode not in ("eval", "predict"):
        return
    positions = checkpoints.finished_positions(workdir)
    if not positions:
        yield f"config.mode={config.mode!r}: {checkpoints.no_checkpoint_message(workdir)}"
    elif config.eval_checkpoint >= 0 and config.eval_checkpoint not in positions:
        yield checkpoints.missing_position_message(
            checkpoints.checkpoint_dir(workdir), config.eval_checkpoint, positions
        )


def count_devices(config: ml_collections.ConfigDict, problems: list[str]) -> tuple[int, int]:
    """(devices, processes) of the run: joins a multi-process run first (parallel.py).

    Only here is the backend started; with a bad `distributed` field nothing is joined.
    """
    joining = ("config.distributed", "config.num_processes", "config.process_id")
    if any(p.startswith(joining) for p in problems):
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
    bad_fields = {p.split("=")[0].removeprefix("config.") for p in problems}
    devices, processes = count_devices(config, problems) if devices is None else (devices, 1)
    later = [
        lambda: schedule_problems(config) if not problems else [],
        lambda: parallel.batch_size_problems(config, devices, processes),
        lambda: network_problems(config),
        lambda: data_problems(config),
        lambda: path_problems(config),
        lambda: predict_problems(config),
        lambda: oracle_problems(config),
        lambda: checkpoint_problems(config, workdir) if "eval_checkpoint" not in bad_fields else [],
    ]
    for check in later:
        try:
            problems += list(check())
        except (TypeError, ValueError, AttributeError, KeyError):
            # A check that relates fields may stumble on a value already reported as wrong;
            # with no such report, its error is a bug to see.
            if not problems:
                raise
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    if config.mode == "train":  # Compare mode checks each method's workdir when it gets there.
        workdir_lib.check_config_unchanged(config, workdir)
