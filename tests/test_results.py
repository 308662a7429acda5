"""Results mode's summary table from hand-written run folders, with exact numbers:
benchmarks (kinds of harm), paired differences, the share of the oracle's gain, the
weight separation per seed, and a target-only run shared by every benchmark."""

import json
import os

from metapix_jax import compare, results


def write_run(root, name, method, seed, miou, *, harm=None, weights=None, extra=None):
    """A finished run as training and compare mode leave it (only what results reads)."""
    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "eval"))
    config = {"method": method, "seed": seed, "weighting": {"kind": "w1"}, "log_every": seed}
    if harm is not None:  # Absent: a run made before the kinds of harm ('confusion').
        config["data"] = {"synthetic_harm": harm}
    config.update(extra or {})
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    evaluation = {"miou": miou, "segmenter_steps": 10, "per_class_iou": {"road": miou}}
    with open(os.path.join(run, "eval", "latest.json"), "w") as f:
        json.dump(evaluation, f)
    if weights is not None:
        compare.save_separation(weights, run)


def separation(auroc, harmful, clean):
    return {
        "auroc": auroc,
        "mean_weight_harmful": harmful,
        "mean_weight_clean": clean,
        "harmful_fraction": 0.0 if harmful != harmful else 0.1,
        "images": 100,
    }


W19 = {"weighting": {"kind": "w19"}}


def robustness_runs(root):
    """Two benchmarks: 'confusion' (seeds 0 and 1, its configs predating the field) and
    'none' (seed 0); target_only only under 'confusion'; W19 on one seed, without
    weights.json."""
    for seed, (target, joint, oracle, meta) in enumerate(
        [(0.25, 0.30, 0.34, 0.32), (0.26, 0.32, 0.35, 0.335)]
    ):
        write_run(root, f"confusion/s{seed}/target_only", "target_only", seed, target)
        write_run(root, f"confusion/s{seed}/direct_joint", "direct_joint", seed, joint)
        write_run(root, f"confusion/s{seed}/oracle_mask", "oracle_mask", seed, oracle)
        weights = separation(0.9 - 0.1 * seed, 0.2 + 0.1 * seed, 0.6 + 0.1 * seed)
        write_run(root, f"confusion/s{seed}/metapix", "metapix", seed, meta, weights=weights)
    write_run(root, "confusion/s0/metapix_w19", "metapix", 0, 0.31, extra=W19)
    write_run(root, "none/s0/direct_joint", "direct_joint", 0, 0.40, harm="none")
    weights = separation(float("nan"), float("nan"), 0.49)
    write_run(root, "none/s0/metapix", "metapix", 0, 0.39, harm="none", weights=weights)


def test_summary_table_by_benchmark_with_paired_differences_and_oracle_share(tmp_path):
    root = str(tmp_path)
    robustness_runs(root)
    table = results.summary_table(root).splitlines()
    assert table[0] == (
        "| benchmark | method | setting | seeds | mIoU mean (sd) | per seed | - direct joint "
        "| of oracle's gain | weight AUROC per seed | mean weight harmful / clean |"
    )
    assert table[2:] == [
        # Target only: -5 and -6 against direct joint: -5.50; -5.5 / 3.5 of the oracle's gain.
        "| harm=confusion | target_only | - | 0 1 | 25.50 (0.71) | 25.00 / 26.00 | -5.50 "
        "| -157% | - | - |",
        "| harm=confusion | direct_joint | - | 0 1 | 31.00 (1.41) | 30.00 / 32.00 | 0 | - | - "
        "| - |",
        "| harm=confusion | oracle_mask | - | 0 1 | 34.50 (0.71) | 34.00 / 35.00 | +3.50 "
        "| - | - | - |",
        # +2 and +1.5: +1.75, half of the oracle's +3.5; sd of 32 and 33.5: 1.5 / sqrt(2).
        "| harm=confusion | metapix | - | 0 1 | 32.75 (1.06) | 32.00 / 33.50 | +1.75 | 50% "
        "| 0.900 / 0.800 | 0.250 / 0.650 |",
        # One seed: no sd; the oracle's gain on that seed alone (+4): +1 is 25% of it.
        "| harm=confusion | metapix | weighting.kind=w19 | 0 | 31.00 (-) | 31.00 | +1.00 | 25% "
        "| - | - / - |",
        # The target-only runs again, paired with this benchmark's direct joint (seed 0 only).
        "| harm=none | target_only | - | 0 1 | 25.50 (0.71) | 25.00 / 26.00 | -15.00 | - | - | - |",
        "| harm=none | direct_joint | - | 0 | 40.00 (-) | 40.00 | 0 | - | - | - |",
        # The control: no oracle row, no AUROC (no harmful pixels), the clean pixels' weight.
        "| harm=none | metapix | - | 0 | 39.00 (-) | 39.00 | -1.00 | - | - | - / 0.490 |",
    ]
    saved = json.load(open(os.path.join(root, "none/s0/metapix", "weights.json")))
    assert saved["auroc"] is None and saved["mean_weight_clean"] == 0.49  # NaN saved as null.


def test_one_benchmark_and_no_oracle_leave_those_cells_empty(tmp_path):
    root = str(tmp_path)
    write_run(root, "a/direct_joint", "direct_joint", 0, 0.30)
    write_run(root, "a/metapix", "metapix", 0, 0.28, weights=separation(0.7, 0.5, 0.6))
    table = results.summary_table(root).splitlines()
    assert table[2:] == [
        "| - | direct_joint | - | 0 | 30.00 (-) | 30.00 | 0 | - | - | - |",
        "| - | metapix | - | 0 | 28.00 (-) | 28.00 | -2.00 | - | 0.700 | 0.500 / 0.600 |",
    ]


def test_no_share_of_an_oracle_that_gains_nothing(tmp_path):
    root = str(tmp_path)
    write_run(root, "a/direct_joint", "direct_joint", 0, 0.30)
    write_run(root, "a/oracle_mask", "oracle_mask", 0, 0.29)
    write_run(root, "a/metapix", "metapix", 0, 0.31)
    rows = results.summary_table(root).splitlines()[2:]
    assert rows[2] == "| - | metapix | - | 0 | 31.00 (-) | 31.00 | +1.00 | - | - | - / - |"


def test_results_mode_writes_summary_then_per_class_table(tmp_path):
    root = str(tmp_path)
    robustness_runs(root)
    text = results.print_results(root)
    assert open(os.path.join(root, "results.md")).read() == text + "\n"
    summary, per_class = text.split("\n\nPer-class IoU (%, mean over seeds):\n\n")
    assert summary == results.summary_table(root)
    assert per_class == results.results_table(root)
    # In the per-class table the benchmark is part of the setting.
    assert "| metapix | data.synthetic_harm=none | 1 | 10 | 39.00 (-) | 39.0 |" in per_class


def test_a_benchmark_label_shows_only_the_fields_its_kind_of_harm_reads():
    p = results.BENCHMARK_PREFIX
    spatial = ((p + "harm", "spatial"), (p + "spatial_px", 4), (p + "noise_rate", 0.12))
    noise = ((p + "harm", "noise"), (p + "spatial_px", 2), (p + "noise_rate", 0.2))
    assert results.benchmark_label(spatial) == "harm=spatial, spatial_px=4"
    assert results.benchmark_label(noise) == "harm=noise, noise_rate=0.2"
    assert results.benchmark_label(((p + "gap", 0.5),)) == "gap=0.5"
    assert results.benchmark_label(()) == "-"


def test_a_run_that_has_not_finished_its_schedule_is_left_out_and_listed(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "a/direct_joint", "direct_joint", 0, 0.30)
    write_run(root, "a/metapix", "metapix", 0, 0.31)
    with open(os.path.join(root, "a/metapix/eval/latest.json")) as f:
        evaluation = json.load(f)
    evaluation["position"] = 10  # configs/default.py's schedule is far longer.
    with open(os.path.join(root, "a/metapix/eval/latest.json"), "w") as f:
        json.dump(evaluation, f)
    text = results.print_results(root)
    assert "| metapix |" not in text.split("Left out")[0]
    total = results.total_positions(os.path.join(root, "a/metapix/config.json"))
    assert total > 10
    assert f"- {root}/a/metapix: position 10 of {total}" in text
