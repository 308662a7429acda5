"""benchmarks/gpu_check.sh, the device check, on its CPU path (--smoke: configs/test.py shapes).

It is meant to be run by a person with one GPU and no time to debug it, so CI runs the same
script end to end at tiny shapes: every stage runs, every figure reaches the JSON and the
markdown, and the training run reuses the step timing's compilations (which the GPU time
budget relies on).
"""

import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402
import step_timing  # noqa: E402

from configs import test as test_config  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(report JSON, markdown, stdout) of one `gpu_check.sh --smoke` run."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", f"--out={out}", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    assert (out / "gpu_check.log").stat().st_size > 0
    return report, (out / "gpu_check.md").read_text(), done.stdout


def test_every_kind_of_every_combination_is_timed(smoke):
    report, _, _ = smoke
    rows = report["step_timing"]
    expected = [(c.name, k) for c in gpu_check.SMOKE.combinations for k in c.kinds]
    assert [(r["combination"], r["kind"]) for r in rows] == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["seconds"] > 0 and r["compile_s"] > 0
        images = r["batch"] * (1 if r["kind"] in ("eval", "target") else 2)
        assert r["images_per_s"] == pytest.approx(images / r["seconds"])
        assert r["achieved_tflops"] == pytest.approx(r["flops"] / r["seconds"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["seconds"] / 1e12 / r["peak_tflops"])
        assert r["height"] == 16 and r["width"] == 32
    for r in rows[:-1]:  # Without remat, XLA executes the model's own arithmetic.
        assert r["flops"] == pytest.approx(r["model_flops"], rel=0.1), r
    remat = rows[-1]
    assert (remat["batch"], remat["dtype"], remat["remat"], remat["unet_remat"]) == (
        2,
        "bfloat16",
        True,
        True,
    )
    # With remat, XLA's count includes the recomputed forward passes; MFU's does not.
    assert remat["model_flops"] < 0.9 * remat["flops"], remat
    env = report["environment"]
    assert env["platform"] == "cpu" and env["device_count"] == 1 and env["jax"]


def test_training_run_reports_every_phase_and_the_miou(smoke):
    report, _, _ = smoke
    run = report["training_run"]
    assert run["status"] == "ok", run.get("output_tail")
    assert "main.py" in run["command"] and "--config=configs/test.py" in run["command"]
    log_every = gpu_check.SMOKE.overrides["log_every"]
    assert [p["kind"] for p in run["phases"]] == ["joint", "meta", "weighted"]
    for phase in run["phases"]:
        assert len(phase["interval_steps_per_s"]) == phase["steps"] // log_every, phase
        assert phase["steps_per_s"] > 0 and phase["first_step_s"] > 0
    # Evaluated after the phases that change the segmenter (not after the meta phase).
    joint, meta, weighted = run["phases"]
    assert [e["position"] for e in run["evaluations"]] == [joint["end"], weighted["end"]]
    assert 0 <= run["miou"] <= 100 and run["miou"] == run["evaluations"][-1]["miou"]


def test_training_run_reuses_the_step_timing_compilations(smoke):
    """Stage 2 builds the same steps from the same config as stage 1's first combination, so
    its first steps come from the persistent compilation cache; otherwise the GPU check
    would compile them twice and overrun its time budget."""
    report, _, _ = smoke
    first = gpu_check.SMOKE.combinations[0].name
    compiled = {
        r["kind"]: r["compile_s"] for r in report["step_timing"] if r["combination"] == first
    }
    phases = {p["kind"]: p["first_step_s"] for p in report["training_run"]["phases"]}
    kinds = ("joint", "meta", "weighted")
    assert sum(phases[k] for k in kinds) < 0.5 * sum(compiled[k] for k in kinds), (phases, compiled)


def test_markdown_shows_every_figure(smoke):
    report, markdown, stdout = smoke
    assert markdown in stdout  # Printed as well as written.
    for r in report["step_timing"]:
        remat = "on" if r["remat"] else "off"
        row = f"| {r['batch']} | {r['dtype']} | {remat} | {r['kind']} | {1e3 * r['seconds']:.1f} |"
        assert row in markdown
        assert f"{100 * r['mfu']:.3g}%" in markdown
    for p in report["training_run"]["phases"]:
        assert f"| {p['kind']} | {p['steps']} | {p['steps_per_s']:.3f} |" in markdown
    assert f"{report['training_run']['miou']:.2f} at" in markdown
    assert "(smoke)" in markdown.splitlines()[0]


def test_a_kind_that_would_compile_past_the_deadline_is_skipped():
    """Skipping happens before anything is compiled; a kind never compiled anywhere is
    expected to take as long as the slowest kind seen."""
    config = step_timing.with_batch(test_config.get_config(), 1)
    start = time.perf_counter()
    rows = step_timing.time_steps(
        config,
        ["joint", "meta"],
        deadline=time.time() + 30,
        expected_compile={"joint": 60.0},
    )
    assert [r["status"] for r in rows] == [
        "skipped: time budget (compile expected 60 s)",
        "skipped: time budget (compile expected 60 s)",
    ]
    assert time.perf_counter() - start < 20  # Nothing was compiled.


def test_missing_modules_are_named_with_the_way_to_carry_them(tmp_path):
    code = (
        "import runpy, sys; sys.modules['grain'] = None; "
        f"sys.argv = ['gpu_check.py', '--out={tmp_path}', '--smoke']; "
        "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "missing Python modules ['grain']" in done.stderr
    assert "benchmarks/gpu_wheels.sh" in done.stderr
    assert not os.listdir(tmp_path)  # Nothing run, nothing written.
