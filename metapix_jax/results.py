"""Results mode: one markdown table from every finished run under a directory.

Each run directory holds `config.json` (written at the start of training) and
`eval/latest.json` (its last evaluation). Runs are grouped by method and by the config
fields that set them apart from the other runs (their "setting"); the seed is what
varies inside a group, so a row gives the mean mIoU, its spread (sample standard
deviation) over the seeds, and the mean IoU of every class.
"""

import collections
import json
import os

import numpy as np

from metapix_jax import methods
from metapix_jax.errors import ConfigError
from metapix_jax.workdir import flatten

# Fields that differ between runs without changing what is trained.
IGNORED_FIELDS = (
    "seed",
    "mode",
    "method",
    "compare_methods",
    "eval_checkpoint",
    "eval_at_phase_end",
    "log_every",
    "image_every",
    "checkpoint_every",
    "keep_periodic",
    "data.synthetic_seed",
    "data.synthetic_root",
    "data.source_root",
    "data.target_root",
)


def find_runs(root: str) -> list[dict]:
    """Every run under `root`: {'dir', 'eval', 'config'} (config flattened)."""
    if not os.path.isdir(root):
        raise ConfigError(f"config.mode='results': --workdir {root!r} is not a directory")
    runs = []
    for dirpath, _, filenames in sorted(os.walk(root, followlinks=True)):
        if os.path.basename(dirpath) != "eval" or "latest.json" not in filenames:
            continue
        run_dir = os.path.dirname(dirpath)
        config_path = os.path.join(run_dir, "config.json")
        if not os.path.exists(config_path):
            raise ConfigError(f"config.mode='results': {config_path} is missing (beside eval/)")
        with open(os.path.join(dirpath, "latest.json")) as f:
            evaluation = json.load(f)
        with open(config_path) as f:
            config = flatten(json.load(f))
        runs.append({"dir": run_dir, "eval": evaluation, "config": config})
    if not runs:
        raise ConfigError(
            f"config.mode='results': no finished run under {root!r} (no eval/latest.json): "
            "train first, or point --workdir at the folder that holds the runs"
        )
    return runs


def settings(runs: list[dict]) -> list[str]:
    """Each run's setting: the fields whose value differs from the most common one.

    A field a run's config.json lacks (written before the field existed) is taken to
    have its default value and never counts as a difference.
    """
    fields = sorted({k for r in runs for k in r["config"]} - set(IGNORED_FIELDS))
    common = {}
    for field in fields:
        values = collections.Counter(repr(r["config"][field]) for r in runs if field in r["config"])
        common[field] = values.most_common(1)[0][0]
    out = []
    for r in runs:
        c = r["config"]
        differ = [f for f in fields if f in c and repr(c[f]) != common[f]]
        out.append(", ".join(f"{f}={c[f]}" for f in differ))
    return out


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs grouped by (method, setting), in the paper's order of methods."""
    groups = collections.defaultdict(list)
    for run, setting in zip(runs, settings(runs), strict=True):
        groups[(run["config"].get("method", "?"), setting)].append(run)

    def order(key):
        method, setting = key
        order = list(methods.METHODS)  # The table's order is the paper's.
        rank = order.index(method) if method in order else len(order)
        return rank, method, setting

    return {key: groups[key] for key in sorted(groups, key=order)}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    spread = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), spread


def class_names(runs: list[dict]) -> list[str]:
    return list(runs[0]["eval"]["per_class_iou"])


def format_row(method: str, setting: str, group: list[dict], classes: list[str]) -> str:
    """One table row: percentages with two decimals for mIoU, one for classes."""
    mean, spread = mean_and_spread([100 * r["eval"]["miou"] for r in group])
    steps = sorted({r["eval"]["segmenter_steps"] for r in group})
    cells = [method, setting or "-", str(len(group)), "/".join(map(str, steps))]
    cells.append(f"{mean:.2f} ({spread:.2f})" if len(group) > 1 else f"{mean:.2f} (-)")
    for name in classes:
        values = [r["eval"]["per_class_iou"].get(name) for r in group]
        values = [v for v in values if v is not None]
        cells.append(f"{100 * np.mean(values):.1f}" if values else "-")
    return "| " + " | ".join(cells) + " |"


def results_table(root: str) -> str:
    """The markdown table of every run under `root`."""
    runs = find_runs(root)
    classes = class_names(runs)
    header = ["method", "setting", "seeds", "segmenter steps", "mIoU mean (sd)", *classes]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (method, setting), group in group_runs(runs).items():
        lines.append(format_row(method, setting, group, classes))
    return "\n".join(lines)


def print_results(root: str) -> str:
    """Results mode: prints the table and saves it as ROOT/results.md."""
    table = results_table(root)
    print(table, flush=True)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    return table
