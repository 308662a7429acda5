"""What a run keeps in its workdir besides checkpoints: the config it was trained with.

`config.json` is written when training starts. A later run in the same workdir must use
the same config, except for fields that do not change the trajectory (what is logged,
saved or evaluated, where the data lives, how fast it is decoded): otherwise the
checkpoints would silently mix two runs.
"""

import json
import os
import sys
from typing import Any

import ml_collections

from metapix_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = "config.json"

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
    "heartbeat_timeout",
    "data.eval_batch",
    "data.target_eval_split",
)
EXEMPT_PREFIXES = ("predict",)  # Any field of a prediction mode.

# Fields added after runs were made, with the value that the code before them behaved as:
# a config.json without the field was trained with that value, and may resume.
ADDED_FIELDS = {
    "data.synthetic_harm": "confusion",
    "data.synthetic_spatial_rate": 0.7,
    "data.synthetic_spatial_px": 2,
    "data.synthetic_noise_rate": 0.12,
    "data.synthetic_appearance": "sidewalk>road,terrain>vegetation,car>truck,bus>train",
    "data.synthetic_appearance_rate": 0.7,
    "weighting.normalization": "none",
}


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
    """Whether a field may differ from the workdir's config.json (e.g. any predict.* field)."""
    return field in EXEMPT_FIELDS or field.split(".")[0] in EXEMPT_PREFIXES


def config_as_saved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (tuples become lists), flattened."""
    return flatten(json.loads(config.to_json_best_effort()))


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: old -> new' for every non-exempt field that differs."""
    changes = []
    for field in sorted(set(saved) | set(current)):
        if exempt(field):
            continue
        old = saved.get(field, ADDED_FIELDS.get(field, "<absent>"))
        new = current.get(field, "<absent>")
        if old != new:
            changes.append(f"{field}: {old!r} -> {new!r}")
    return changes


def check_config_unchanged(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Refuses a workdir whose config.json differs in a field that changes training.

    Returns the changes that were allowed (config.allow_config_change), to be reported.
    """
    path = os.path.join(workdir, CONFIG_FILE)
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


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json (atomically: a crash never leaves half a file to compare with)."""
    import jax  # Here, not above: main.py reads config.json (configs/saved.py) before JAX.

    from metapix_jax import filesystem

    if jax.process_index() == 0:
        path = os.path.join(workdir, CONFIG_FILE)
        filesystem.write_atomically(path, config.to_json_best_effort(indent=2))


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's config: every field, with its default value."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import default

    return default.get_config()


def load_config(path: str) -> ml_collections.ConfigDict:
    """A run's config.json as a locked config: configs/default.py's fields, with the run's
    values (JSON lists back as tuples where the field holds a tuple). Fields the file lacks
    (added later) keep their defaults, which ADDED_FIELDS says the old code behaved as."""
    with open(path) as f:
        saved = flatten(json.load(f))
    config = default_config()
    for field, value in saved.items():
        *groups, name = field.split(".")
        target = config
        for group in groups:
            target = target.get(group) if isinstance(target, ml_collections.ConfigDict) else None
        if not isinstance(target, ml_collections.ConfigDict) or name not in target:
            continue  # A field this version no longer has.
        target[name] = tuple(value) if isinstance(target[name], tuple) else value
    config.lock()
    return config
