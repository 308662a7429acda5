"""Results mode: markdown tables from every finished run under a directory.

Each run directory holds `config.json` (written at the start of training),
`eval/latest.json` (its last evaluation) and, for a run that learned pixel weights in
compare mode, `weights.json` (how well they separate the benchmark's harmful pixels).

Runs are grouped by benchmark (the `data.synthetic_*` fields that differ between runs,
e.g. the kind of harm), then by method and by the other config fields that set them
apart (their "setting"); the seed is what varies inside a group. Two tables:

- the summary: per row the mean mIoU, its spread (sample standard deviation) over the
  seeds and each seed's value; the mean *paired* difference against direct joint training
  on the same benchmark and seed (seeds share the generated data and the first steps, so
  the pair is the fair comparison); the share of the oracle's gain it takes; and, for
  methods that learn weights, each seed's weight AUROC and the mean weights;
- the per-class IoU of every (method, setting), with the benchmark fields in the setting.

A method that never reads a source image (target_only) does not depend on the fields that
only change the source (the kind of harm and its parameters): one run of it per seed
serves every benchmark, and its row is repeated under each.
"""

import collections
import json
import os
from typing import Any

import numpy as np

from metapix_jax import methods, schedule
from metapix_jax.data import synthetic
from metapix_jax.errors import ConfigError
from metapix_jax.workdir import ADDED_FIELDS, flatten, load_config

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
BENCHMARK_PREFIX = "data.synthetic_"  # Fields that describe the generated benchmark.
# Benchmark fields that change only the source images and labels (the target is the same
# bytes whatever they are: data/synthetic.py), so runs that never read the source ignore them.
SOURCE_ONLY_FIELDS = tuple(
    BENCHMARK_PREFIX + name
    for name in (*synthetic.HARM_FIELDS, "harm_rate", "confusions", "gap", "num_source")
)
REFERENCE = "direct_joint"  # Paired differences are taken against this method's runs.
ORACLE = "oracle_mask"  # The bound of pixel weighting: gains are a share of its gain.
WEIGHTS_FILE = "weights.json"  # Written by compare mode (compare.save_separation).

Benchmark = tuple[tuple[str, Any], ...]  # (field, value) of the benchmark fields that differ.


def total_positions(config_path: str) -> int | None:
    """The length of a run's schedule, from its config.json (None if it cannot be read)."""
    try:
        return schedule.total_positions(load_config(config_path))
    except Exception:  # noqa: BLE001 - an old or hand-made config: no check.
        return None


def finished(run: dict) -> bool:
    """Whether the run's last evaluation is at the end of its schedule (a run in progress
    or stopped has evaluated only its earlier phases). Unknown counts as finished."""
    position = run["eval"].get("position")
    return position is None or run["total"] is None or position >= run["total"]


def find_runs(root: str, with_unfinished: bool = False) -> list[dict]:
    """Every finished run under `root` (`with_unfinished`: every run):
    {'dir', 'eval', 'config', 'weights', 'total'} (config flattened; weights None without
    weights.json). A field the config lacks because it was added after the run gets the
    value the code before it behaved as (workdir.ADDED_FIELDS)."""
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
        weights_path = os.path.join(run_dir, WEIGHTS_FILE)
        weights = None
        if os.path.exists(weights_path):
            with open(weights_path) as f:
                weights = json.load(f)
        config = {**ADDED_FIELDS, **config}
        run = {"dir": run_dir, "eval": evaluation, "config": config, "weights": weights}
        run["total"] = total_positions(config_path)
        if finished(run) or with_unfinished:
            runs.append(run)
    if not runs and not with_unfinished:
        raise ConfigError(
            f"config.mode='results': no finished run under {root!r} (no eval/latest.json): "
            "train first, or point --workdir at the folder that holds the runs"
        )
    return runs


def settings(runs: list[dict], exclude_prefix: str | None = None) -> list[str]:
    """Each run's setting: the fields whose value differs from the most common one
    (fields starting with `exclude_prefix` left out).

    A field a run's config.json lacks (written before the field existed) is taken to
    have its default value and never counts as a difference.
    """
    fields = sorted({k for r in runs for k in r["config"]} - set(IGNORED_FIELDS))
    if exclude_prefix:
        fields = [f for f in fields if not f.startswith(exclude_prefix)]
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


def method_rank(method: str) -> tuple[int, str]:
    """Rows follow the paper's order of methods (methods.METHODS)."""
    order = list(methods.METHODS)
    return (order.index(method) if method in order else len(order)), method


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs grouped by (method, setting), in the paper's order of methods."""
    groups = collections.defaultdict(list)
    for run, setting in zip(runs, settings(runs), strict=True):
        groups[(run["config"].get("method", "?"), setting)].append(run)
    return {key: groups[key] for key in sorted(groups, key=lambda k: (method_rank(k[0]), k[1]))}


def reads_source(run: dict) -> bool:
    method = run["config"].get("method")
    return method not in methods.METHODS or methods.METHODS[method].reads_source


def benchmarks(runs: list[dict]) -> list[Benchmark]:
    """Each run's benchmark: the data.synthetic_* fields whose values differ between runs,
    without the source-only ones for a run that never reads a source image (a partial
    benchmark, matching every full one that agrees with it)."""
    fields = sorted(
        {k for r in runs for k in r["config"] if k.startswith(BENCHMARK_PREFIX)}
        - set(IGNORED_FIELDS)
    )
    varying = [
        f for f in fields if len({repr(r["config"][f]) for r in runs if f in r["config"]}) > 1
    ]
    out = []
    for r in runs:
        keep = [
            f
            for f in varying
            if f in r["config"] and (reads_source(r) or f not in SOURCE_ONLY_FIELDS)
        ]
        out.append(tuple((f, r["config"][f]) for f in keep))
    return out


def benchmark_order(benchmark: Benchmark) -> tuple:
    """Kinds of harm in synthetic.HARM_KINDS's order, then the other fields' values."""
    key = []
    for field, value in benchmark:
        harm = field == BENCHMARK_PREFIX + "harm" and value in synthetic.HARM_KINDS
        key.append(
            (synthetic.HARM_KINDS.index(value) if harm else len(synthetic.HARM_KINDS), repr(value))
        )
    return tuple(key)


# The benchmark fields that only one kind of harm reads: shown only beside that kind.
KIND_FIELDS = {
    "confusion": ("harm_rate", "confusions"),
    "spatial": ("spatial_rate", "spatial_px"),
    "noise": ("noise_rate",),
    "appearance": ("appearance", "appearance_rate"),
}


def benchmark_label(benchmark: Benchmark) -> str:
    """'harm=spatial, spatial_px=3' ('-' when every run has the same benchmark); a field
    that the benchmark's kind of harm does not read is left out."""
    fields = dict(benchmark)
    kind = fields.get(BENCHMARK_PREFIX + "harm")
    unread = {n for k, names in KIND_FIELDS.items() if k != kind for n in names}
    if kind is not None:
        unread -= set(KIND_FIELDS.get(kind, ()))
    shown = [(f.removeprefix(BENCHMARK_PREFIX), v) for f, v in benchmark]
    text = ", ".join(f"{f}={v}" for f, v in shown if kind is None or f not in unread)
    return text or "-"


def summary_groups(runs: list[dict]) -> dict[Benchmark, dict[tuple[str, str], list[dict]]]:
    """{benchmark: {(method, setting): runs}}: benchmarks in order, methods in the paper's.

    Benchmarks are those of the runs that read the source (or of all runs if none does); a
    run without the source-only fields joins every benchmark it agrees with.
    """
    marks = benchmarks(runs)
    marks_by_run = dict(zip(map(id, runs), marks, strict=True))
    setting_by_run = dict(zip(map(id, runs), settings(runs, BENCHMARK_PREFIX), strict=True))
    full = {b for r, b in zip(runs, marks, strict=True) if reads_source(r)} or set(marks)
    out = {}
    for benchmark in sorted(full, key=benchmark_order):
        fields = dict(benchmark)
        groups = collections.defaultdict(list)
        for r in runs:
            if all(fields.get(f) == v for f, v in marks_by_run[id(r)]):
                groups[(r["config"].get("method", "?"), setting_by_run[id(r)])].append(r)
        out[benchmark] = {
            key: groups[key] for key in sorted(groups, key=lambda k: (method_rank(k[0]), k[1]))
        }
    return out


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    spread = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), spread


def miou_by_seed(group: list[dict]) -> dict[int, float]:
    """mIoU in % per seed (the mean if a seed has several runs), in seed order."""
    by_seed = collections.defaultdict(list)
    for r in group:
        by_seed[r["config"].get("seed")].append(100 * r["eval"]["miou"])
    return {s: float(np.mean(by_seed[s])) for s in sorted(by_seed)}


def paired_gain(row: dict[int, float], reference: dict[int, float], seeds) -> float:
    """Mean over `seeds` of the row's mIoU minus the reference's on the same seed."""
    return float(np.mean([row[s] - reference[s] for s in seeds]))


def learns_weights(method: str) -> bool:
    return method in methods.METHODS and methods.method_learns_weights(method)


def weight_cells(method: str, group: list[dict]) -> tuple[str, str]:
    """(AUROC per seed, mean weight on harmful / clean pixels over seeds); '-' where a
    value does not exist (a method without weights, a run without weights.json, a
    benchmark without harmful pixels)."""
    if not learns_weights(method):
        return "-", "-"
    ordered = sorted(group, key=lambda r: r["config"].get("seed"))
    found = [r["weights"] for r in ordered if r["weights"]]

    def value(w: dict | None, key: str) -> float | None:
        v = w.get(key) if w else None
        return None if v is None or not np.isfinite(v) else float(v)

    aurocs = [value(r["weights"], "auroc") for r in ordered]
    auroc = " / ".join("-" if a is None else f"{a:.3f}" for a in aurocs)
    means = []
    for key in ("mean_weight_harmful", "mean_weight_clean"):
        values = [v for v in (value(w, key) for w in found) if v is not None]
        means.append(f"{np.mean(values):.3f}" if values else "-")
    if all(a is None for a in aurocs):
        auroc = "-"
    return auroc, " / ".join(means)


def summary_row(
    benchmark: Benchmark,
    method: str,
    setting: str,
    group: list[dict],
    reference: dict[int, float] | None,
    oracle: dict[int, float] | None,
) -> str:
    """One row of the summary table (see the module docstring for the columns)."""
    values = miou_by_seed(group)
    mean, spread = mean_and_spread(list(values.values()))
    is_reference = method == REFERENCE and not setting
    is_oracle = method == ORACLE and not setting
    paired = [s for s in values if reference and s in reference]
    if is_reference:
        difference = "0"
    elif paired:
        difference = f"{paired_gain(values, reference, paired):+.2f}"
    else:
        difference = "-"
    share = "-"
    both = [s for s in paired if oracle and s in oracle]
    if both and not (is_reference or is_oracle):
        possible = paired_gain(oracle, reference, both)
        if possible > 0:  # Without a gain to take, a share means nothing.
            share = f"{100 * paired_gain(values, reference, both) / possible:.0f}%"
    auroc, mean_weights = weight_cells(method, group)
    cells = [
        benchmark_label(benchmark),
        method,
        setting or "-",
        " ".join(map(str, values)),
        f"{mean:.2f} ({spread:.2f})" if len(values) > 1 else f"{mean:.2f} (-)",
        " / ".join(f"{v:.2f}" for v in values.values()),
        difference,
        share,
        auroc,
        mean_weights,
    ]
    return "| " + " | ".join(cells) + " |"


SUMMARY_HEADER = (
    "benchmark",
    "method",
    "setting",
    "seeds",
    "mIoU mean (sd)",
    "per seed",
    "- direct joint",
    "of oracle's gain",
    "weight AUROC per seed",
    "mean weight harmful / clean",
)


def summary_table(root: str) -> str:
    """The summary table of every run under `root`: one block of rows per benchmark."""
    runs = find_runs(root)
    lines = ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + " --- |" * len(SUMMARY_HEADER)]
    for benchmark, groups in summary_groups(runs).items():
        reference = groups.get((REFERENCE, ""))
        oracle = groups.get((ORACLE, ""))
        reference_miou = miou_by_seed(reference) if reference else None
        oracle_miou = miou_by_seed(oracle) if oracle else None
        for (method, setting), group in groups.items():
            row = summary_row(benchmark, method, setting, group, reference_miou, oracle_miou)
            lines.append(row)
    return "\n".join(lines)


def class_names(runs: list[dict]) -> list[str]:
    return list(runs[0]["eval"]["per_class_iou"])


def format_row(method: str, setting: str, group: list[dict], classes: list[str]) -> str:
    """One per-class table row: percentages with two decimals for mIoU, one for classes."""
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
    """The per-class table of every run under `root` (benchmark fields in the setting)."""
    runs = find_runs(root)
    classes = class_names(runs)
    header = ["method", "setting", "seeds", "segmenter steps", "mIoU mean (sd)", *classes]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (method, setting), group in group_runs(runs).items():
        lines.append(format_row(method, setting, group, classes))
    return "\n".join(lines)


def print_results(root: str) -> str:
    """Results mode: prints the summary and the per-class table, saves both as
    ROOT/results.md, and returns that text."""
    text = "\n".join(
        [summary_table(root), "", "Per-class IoU (%, mean over seeds):", "", results_table(root)]
    )
    left_out = [r for r in find_runs(root, with_unfinished=True) if not finished(r)]
    if left_out:
        text += "\n\nLeft out, not finished (their last evaluation is not the schedule's end):\n"
        text += "\n".join(
            f"- {r['dir']}: position {r['eval']['position']} of {r['total']}" for r in left_out
        )
    print(text, flush=True)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(text + "\n")
    return text
