"""Compare mode: several methods trained on the same data, and a table of their mIoU.

On the embedded benchmark it also measures what MetaPix learned: how well its weights
separate the source pixels known to be harmful (mislabeled) from the clean ones.
"""

import json
import os
import shutil
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from metapix_jax import (
    checkpoints,
    console,
    evaluate,
    figures,
    methods,
    parallel,
    progress,
    schedule,
    steps,
)
from metapix_jax import state as state_lib
from metapix_jax.data import datasets, sources

WEIGHTS_FILE = "weights.json"  # A weight-learning run's separation, in its workdir.


def auroc(negative_scores: np.ndarray, positive_scores: np.ndarray) -> float:
    """P(positive score > negative score), ties counting half (Mann-Whitney U)."""
    scores = np.concatenate([negative_scores, positive_scores])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value, so tied scores share their rank.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = mean_rank[inverse]
    n_neg, n_pos = len(negative_scores), len(positive_scores)
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_neg * n_pos))


def weight_separation(
    config: ml_collections.ConfigDict, workdir: str, num_images: int = 100
) -> dict | None:
    """AUROC and mean weights of harmful vs clean labeled source pixels, or None; also
    draws WORKDIR/weights.png (figures.py).

    Uses the final weighting network of the run in `workdir` on the first `num_images`
    source images (no flip). A high AUROC means low weights where the labels are wrong.
    Every process computes the weights of its rows of each batch; the AUROC needs every
    pixel, so the rows are then gathered (the same figures on every process).
    """
    data = datasets.get_datasets(config, workdir, with_source=True)
    images = datasets.Head(data.source, num_images)
    mesh = parallel.make_mesh()
    state = evaluate.restore_for_reading(config, workdir, mesh)
    inference = steps.make_inference(config, mesh)
    figures.write_weights_figure(state, inference, data, mesh, os.path.join(workdir, "weights.png"))
    if not len(images) or not os.path.exists(datasets.harmful_mask_path(images.name(0))):
        return None
    weights, harmful, valid = [], [], []
    rows = config.data.eval_batch
    share = rows // jax.process_count()
    first = jax.process_index() * share  # This process's rows of each batch (eval_batches).
    for i, batch in enumerate(data.eval_batches(images)):
        inputs = {"source_image": batch["image"], "source_label": batch["label"]}
        w = figures.local_rows(inference.weights(state, parallel.to_global(inputs, mesh)), share)
        for j in range(share):
            index = i * rows + first + j  # Rows past the last image pad the last batch.
            label = batch["label"][j]
            real = index < len(images)
            path = datasets.harmful_mask_path(images.name(index)) if real else ""
            weights.append(w[j].ravel())
            harmful.append(sources.read_mask(path).ravel() if real else np.zeros(label.size, bool))
            valid.append(real & (label.ravel() != config.data.ignore_label))
    w, h, v = np.concatenate(weights), np.concatenate(harmful), np.concatenate(valid)
    if jax.process_count() > 1:  # Same-shaped arrays on every process: gather them all.
        w, h, v = (np.asarray(x).ravel() for x in multihost_utils.process_allgather((w, h, v)))
    w, h = w[v], h[v]
    return {
        "auroc": auroc(-w[~h], -w[h]),  # Harmful pixels should get the lower weights.
        "mean_weight_harmful": float(w[h].mean()) if h.any() else float("nan"),
        "mean_weight_clean": float(w[~h].mean()),
        "harmful_fraction": float(h.mean()),
        "images": len(images),
    }


def write_separation(separation: dict, workdir: str, position: int) -> None:
    """The weight separation as TensorBoard scalars beside the run's other summaries."""
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    keys = ("auroc", "mean_weight_harmful", "mean_weight_clean")
    writer.write_scalars(position, {f"weights/{k}": separation[k] for k in keys})
    writer.close()


def save_separation(separation: dict, workdir: str) -> None:
    """The weight separation as WORKDIR/weights.json, beside eval/latest.json, where results
    mode reads it (compare.json holds only the methods of the last comparison). An AUROC
    that does not exist (no harmful pixels: the control) is written as null."""
    if jax.process_index() == 0:
        clean = {
            k: None if isinstance(v, float) and np.isnan(v) else v for k, v in separation.items()
        }
        with open(os.path.join(workdir, WEIGHTS_FILE), "w") as f:
            json.dump(clean, f, indent=2)


def joint_phase_signature(config: ml_collections.ConfigDict) -> dict | None:
    """What the first N1 steps depend on, or None if they are not joint steps.

    Two configs with equal signatures take identical joint phases (same seed, data,
    segmenter, optimiser and lr horizon): one run's checkpoint at N1 serves the other.
    """
    if schedule.phases(config)[0].kind != "joint":
        return None
    c = config.to_dict()
    return {
        "seed": c["seed"],
        "data": {k: v for k, v in c["data"].items() if k != "synthetic_root"},
        "model": c["model"],
        "optim": c["optim"],
        "loss": c["loss"],
        "joint_steps": c["schedule"]["joint_steps"],
        "segmenter_steps": state_lib.total_segmenter_steps(config),
        "source_without_harm": methods.METHODS[config.method].source_without_harm,
    }


def reuse_pretraining(
    config: ml_collections.ConfigDict,
    source_config: ml_collections.ConfigDict,
    source_dir: str,
    dest_dir: str,
) -> bool:
    """Starts a run from another run's checkpoint at the end of its joint phase.

    Valid when both take the same first N1 steps (equal joint_phase_signature): the
    segmenter state is exactly what the run would reach itself. The U-Net is not trained
    in those steps, so it is this run's own initial one (W19's shape may differ from the
    source's). Returns whether it did; a run that already has checkpoints is left alone.
    """
    signature = joint_phase_signature(config)
    if signature is None or signature != joint_phase_signature(source_config):
        return False
    position = config.schedule.joint_steps
    source_manager = checkpoints.make_manager(source_dir)
    dest_manager = checkpoints.make_manager(dest_dir)
    try:
        if position not in source_manager.all_steps() or dest_manager.latest_step() is not None:
            return False
        mesh = parallel.make_mesh()
        template = parallel.state_template(source_config, mesh)
        state = checkpoints.restore(source_manager, template, position)
        # As host arrays, then replicated over the mesh like the restored rest: several
        # processes save together (jax cannot place one device's array on all of them).
        unet_params, unet_opt_state = jax.device_get(state_lib.fresh_weighting(config, 0))
        state = state.replace(unet_params=unet_params, unet_opt_state=unet_opt_state)
        checkpoints.save(dest_manager, parallel.put_replicated(state, mesh))
        copy_evaluation(source_dir, dest_dir, position)
    finally:
        source_manager.close()
        dest_manager.close()
    console.say(
        config.method,
        f"its first {position} steps are direct_joint's joint phase, the same steps: "
        "starting from that checkpoint",
    )
    return True


def copy_evaluation(source_dir: str, dest_dir: str, position: int) -> None:
    """Copies the source run's evaluation at `position` (the same segmenter), so that the
    run does not redo it as an evaluation a kill interrupted (train.py)."""
    source = evaluate.result_path(source_dir, position)
    if os.path.exists(source) and jax.process_index() == 0:
        dest = evaluate.result_path(dest_dir, position)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(source, dest)


def method_config(config: ml_collections.ConfigDict, name: str, workdir: str):
    """The config of one entry of the comparison, sharing the benchmark's files."""
    method, overrides = methods.resolve(name)
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.method = method
    sub.mode = "train"
    sub.data.synthetic_root = datasets.benchmark_root(config, workdir)
    for field, value in overrides.items():
        group, key = field.split(".")
        sub[group][key] = value
    return sub


def run_comparison(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_and_evaluate: Callable[[ml_collections.ConfigDict, str], dict],
) -> dict:
    """Trains each of config.compare_methods in WORKDIR/<name> with `train_and_evaluate`
    (train.py's, passed in by main.py); prints and saves a table.

    Runs whose joint phase equals direct_joint's start from its checkpoint at N1, so
    list direct_joint before them to share the pre-training.
    """
    configs = {name: method_config(config, name, workdir) for name in config.compare_methods}
    results, speeds = {}, {}
    for k, (name, sub) in enumerate(configs.items(), start=1):
        left = remaining_seconds(list(configs.values())[k - 1 :], speeds, configs)
        about = f"; about {progress.format_seconds(left)} left in all" if speeds else ""
        console.say("compare", f"method {k} of {len(configs)}: {name}{about}")
        method_dir = os.path.join(workdir, name)
        if name != "direct_joint" and "direct_joint" in results:
            source = configs["direct_joint"]
            reuse_pretraining(sub, source, os.path.join(workdir, "direct_joint"), method_dir)
        results[name] = {"eval": train_and_evaluate(sub, method_dir)}
        speeds.update(results[name]["eval"].get("seconds_per_step", {}))
        if methods.learns_weights(sub):
            results[name]["weights"] = separation = weight_separation(sub, method_dir)
            if separation:
                write_separation(separation, method_dir, results[name]["eval"]["position"])
                save_separation(separation, method_dir)
            if name == "metapix" and jax.process_index() == 0:  # The picture to look at.
                shutil.copyfile(f"{method_dir}/weights.png", f"{workdir}/weights.png")
    table = format_table(results)
    if jax.process_index() == 0:
        print(table, flush=True)
        with open(os.path.join(workdir, "compare.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(workdir, "compare.md"), "w") as f:
            f.write(table + "\n")
    return results


def remaining_seconds(todo: list, speeds: dict[str, float], configs: dict) -> float:
    """About how long the methods in `todo` take, at the step speeds seen so far (a step kind
    not seen yet at the slowest seen); a joint phase shared with direct_joint costs nothing."""
    if not speeds:
        return float("nan")
    shared = joint_phase_signature(configs["direct_joint"]) if "direct_joint" in configs else None
    total = 0.0
    for sub in todo:
        plan = schedule.phases(sub)
        if sub.method != "direct_joint" and shared and joint_phase_signature(sub) == shared:
            plan = plan[1:]
        total += sum(p.length * speeds.get(p.kind, max(speeds.values())) for p in plan)
    return total


def format_table(results: dict) -> str:
    """A markdown table: mIoU of each method, and MetaPix's weight separation."""
    lines = ["| method | target val mIoU | segmenter steps |", "| --- | --- | --- |"]
    for method, r in results.items():
        e = r["eval"]
        lines.append(f"| {method} | {100 * e['miou']:.2f} | {e['segmenter_steps']} |")
    for method, r in results.items():
        w = r.get("weights")
        if w and not w["harmful_fraction"]:
            lines.append("")
            lines.append(
                f"{method} weights on {w['images']} source images: no harmful pixels (a "
                f"control), mean weight {w['mean_weight_clean']:.3f}"
            )
        elif w:
            lines.append("")
            lines.append(
                f"{method} weights on {w['images']} source images: AUROC {w['auroc']:.3f} "
                f"(harmful vs clean pixels), mean weight {w['mean_weight_harmful']:.3f} on "
                f"harmful ({100 * w['harmful_fraction']:.1f}% of pixels) vs "
                f"{w['mean_weight_clean']:.3f} on clean"
            )
    return "\n".join(lines)
