"""main.py end to end on the tiny config: all three methods, checkpoints, then eval mode."""

import glob
import io
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import run_main

from configs import test as test_config
from metapix_jax import compare, evaluate, parallel, steps
from metapix_jax.data import datasets, labels


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compare"))
    proc = run_main("--config=configs/test.py", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


def test_compare_trains_all_three_methods_and_prints_a_table(compare_run):
    workdir, stdout = compare_run
    assert "| target_only |" in stdout and "| direct_joint |" in stdout
    assert "| metapix |" in stdout and "AUROC" in stdout
    results = json.load(open(os.path.join(workdir, "compare.json")))
    assert set(results) == {"target_only", "direct_joint", "metapix"}
    for method, r in results.items():
        assert r["eval"]["segmenter_steps"] == 3 + 2 * 2  # N1 + G * N3 for every method.
        assert f"| {method} | {100 * r['eval']['miou']:.2f} | 7 |" in stdout
        latest = json.load(open(os.path.join(workdir, method, "eval", "latest.json")))
        run_only = ("nonfinite_skipped", "seconds_per_step")  # Not in the eval JSON.
        assert latest == {k: v for k, v in r["eval"].items() if k not in run_only}
    assert 0 <= results["metapix"]["weights"]["auroc"] <= 1
    assert f"AUROC {results['metapix']['weights']['auroc']:.3f}" in stdout


def flat_checkpoint(workdir: str, position: int) -> dict:
    path = os.path.join(workdir, "checkpoints", str(position), "default")
    return dict(ocp.tree.to_flat_dict(ocp.StandardCheckpointer().restore(path)))


def test_metapix_starts_from_direct_joints_pretraining_and_then_departs(compare_run):
    """Both take the same 3 joint steps (compare mode copies the checkpoint); the weighted
    phases then train another segmenter than direct joint's."""
    workdir, _ = compare_run
    joint_dj, joint_mp = (flat_checkpoint(f"{workdir}/{m}", 3) for m in ("direct_joint", "metapix"))
    for key, value in joint_dj.items():
        if key[0] in ("params", "opt_state"):
            np.testing.assert_array_equal(value, joint_mp[key], err_msg=str(key))
    final_dj, final_mp = (
        flat_checkpoint(f"{workdir}/direct_joint", 7),
        flat_checkpoint(f"{workdir}/metapix", 11),
    )
    params = [k for k in final_dj if k[0] == "params"]
    assert any(not np.array_equal(final_dj[k], final_mp[k]) for k in params)


def test_the_reported_miou_equals_a_numpy_confusion_of_the_final_model(compare_run):
    """The eval JSON against an independent count: the final checkpoint's argmax on every
    val image, a confusion matrix by numpy's bincount, IoU = TP / (TP + FP + FN)."""
    workdir, _ = compare_run
    config = compare.method_config(test_config.get_config(), "metapix", workdir)
    mesh = parallel.make_mesh()
    state = evaluate.restore_for_reading(config, f"{workdir}/metapix", mesh)
    predict = steps.make_inference(config, mesh).predict
    data = datasets.get_datasets(config, workdir, with_source=False)
    counts = np.zeros((19, 19), np.int64)
    for batch in data.eval_batches():
        logits = np.asarray(
            jax.device_get(predict(state, parallel.to_global(batch, mesh)["image"]))
        )
        label, prediction = batch["label"].ravel(), logits.argmax(-1).ravel()
        keep = label != 255
        counts += np.bincount(19 * label[keep] + prediction[keep], minlength=361).reshape(19, 19)
    tp = np.diag(counts)
    union = counts.sum(0) + counts.sum(1) - tp
    expected = {c: tp[i] / union[i] for i, c in enumerate(labels.CLASS_NAMES) if union[i]}
    reported = json.load(open(f"{workdir}/metapix/eval/latest.json"))
    assert reported["labeled_pixels"] == int(counts.sum()) > 0
    got = {c: v for c, v in reported["per_class_iou"].items() if v is not None}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert reported["miou"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_checkpoints_at_every_phase_end_and_tensorboard_logs(compare_run):
    workdir, _ = compare_run
    # metapix: joint 3, then (meta 2, weighted 2) x 2 -> phase ends 3, 5, 7, 9, 11.
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/metapix/checkpoints/*"))
    assert {3, 5, 7, 9, 11} <= set(saved)
    for method in ("target_only", "direct_joint", "metapix"):
        assert glob.glob(f"{workdir}/{method}/events.out.tfevents.*"), method
        assert os.path.exists(f"{workdir}/{method}/eval/latest.json")


def test_eval_mode_reads_the_checkpoints_with_the_runs_own_config(compare_run):
    """Eval of a compare-mode method: the benchmark it trained on (from its config.json), no
    regeneration, the same mIoU; by the config file, or by the run's folder as --config."""
    workdir, _ = compare_run
    method_dir = os.path.join(workdir, "metapix")
    trained = json.load(open(os.path.join(method_dir, "eval", "latest.json")))
    os.remove(os.path.join(method_dir, "eval", "latest.json"))
    proc = run_main("--config=configs/test.py", f"--workdir={method_dir}", "--config.mode=eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"with the run's own config ({method_dir}/config.json)" in proc.stdout
    assert not os.path.exists(os.path.join(method_dir, "benchmark"))  # Nothing regenerated.
    evaluated = json.load(open(os.path.join(method_dir, "eval", "latest.json")))
    assert evaluated["position"] == 11
    assert evaluated["miou"] == pytest.approx(trained["miou"])
    # An earlier checkpoint by position, with the run's folder as the config.
    proc = run_main(
        f"--config={method_dir}",
        f"--workdir={method_dir}",
        "--config.mode=eval",
        "--config.eval_checkpoint=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(method_dir, "eval", "eval_00000003.json"))


def plugin_of(events, tag: str) -> str:
    return events.SummaryMetadata(tag).plugin_data.plugin_name


def test_tensorboard_shows_the_weight_maps_and_compare_draws_them(compare_run):
    """The composite images (source | label | weights | harmful mask) are in the event files;
    WORKDIR/weights.png holds MetaPix's final maps in the same layout."""
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    workdir, _ = compare_run
    events = event_accumulator.EventAccumulator(
        f"{workdir}/metapix", size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    # Images are summaries of the image plugin, stored as tensors [width, height, PNG, ...].
    images = {t for t in events.Tags()["tensors"] if plugin_of(events, t) == "images"}
    assert {"source/image_label_weights_harmful", "target/image_label_prediction"} <= images
    last = events.Tensors("source/image_label_weights_harmful")[-1]
    width, height, png, *_ = tensor_util.make_ndarray(last.tensor_proto)
    shown = Image.open(io.BytesIO(png))
    assert (shown.width, shown.height) == (int(width), int(height))
    assert shown.width > 4 * 32 and shown.height >= 2 * 16  # Four panels, two examples, enlarged.
    with Image.open(f"{workdir}/weights.png") as figure:
        assert figure.width == shown.width and figure.height > shown.height  # Four examples.
    assert os.path.exists(f"{workdir}/metapix/weights.png")


def test_eval_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = run_main("--config=configs/test.py", f"--workdir={tmp_path}", "--config.mode=eval")
    assert proc.returncode != 0
    assert "no checkpoint in" in proc.stderr


def test_a_config_typo_is_an_error(tmp_path):
    proc = run_main("--config=configs/test.py", f"--workdir={tmp_path}", "--config.model.widht=2")
    assert proc.returncode != 0
    assert "widht" in proc.stderr
