"""main.py end to end on the tiny config: all three methods, checkpoints, then eval mode."""

import glob
import json
import os

import pytest
from cli import run_main


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
    for r in results.values():
        assert r["eval"]["segmenter_steps"] == 3 + 2 * 2  # N1 + G * N3 for every method.
        assert 0 <= r["eval"]["miou"] <= 1
    assert 0 <= results["metapix"]["weights"]["auroc"] <= 1


def test_checkpoints_at_every_phase_end_and_tensorboard_logs(compare_run):
    workdir, _ = compare_run
    # metapix: joint 3, then (meta 2, weighted 2) x 2 -> phase ends 3, 5, 7, 9, 11.
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/metapix/checkpoints/*"))
    assert {3, 5, 7, 9, 11} <= set(saved)
    for method in ("target_only", "direct_joint", "metapix"):
        assert glob.glob(f"{workdir}/{method}/events.out.tfevents.*"), method
        assert os.path.exists(f"{workdir}/{method}/eval/latest.json")


def test_eval_mode_reads_the_checkpoints(compare_run):
    workdir, _ = compare_run
    method_dir = os.path.join(workdir, "metapix")
    trained = json.load(open(os.path.join(method_dir, "eval", "latest.json")))
    os.remove(os.path.join(method_dir, "eval", "latest.json"))
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={method_dir}",
        "--config.mode=eval",
        "--config.method=metapix",
        f"--config.data.synthetic_root={workdir}/benchmark",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.load(open(os.path.join(method_dir, "eval", "latest.json")))
    assert evaluated["position"] == 11
    assert evaluated["miou"] == pytest.approx(trained["miou"])
    # An earlier checkpoint by position.
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={method_dir}",
        "--config.mode=eval",
        "--config.eval_checkpoint=3",
        f"--config.data.synthetic_root={workdir}/benchmark",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(method_dir, "eval", "eval_00000003.json"))


def test_eval_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = run_main("--config=configs/test.py", f"--workdir={tmp_path}", "--config.mode=eval")
    assert proc.returncode != 0
    assert "no checkpoint in" in proc.stderr


def test_a_config_typo_is_an_error(tmp_path):
    proc = run_main("--config=configs/test.py", f"--workdir={tmp_path}", "--config.model.widht=2")
    assert proc.returncode != 0
    assert "widht" in proc.stderr
