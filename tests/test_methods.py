"""The baselines and ablations: their losses against numpy, FDA's spectrum, the schedules,
the results table from hand-written runs, and every method through main.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import all_steps, fresh_state, random_batch
from cli import run_main

from configs import test as test_config
from metapix_jax import (
    compare,
    fda,
    hrselect,
    losses,
    methods,
    parallel,
    results,
    schedule,
    train,
    validation,
)
from metapix_jax import state as state_lib
from metapix_jax.data import datasets, sources


def random_logits_and_labels(seed=0, shape=(2, 3, 4), classes=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, classes)).astype(np.float32) * 2
    labels = rng.integers(0, classes, shape).astype(np.int32)
    labels[0, 0, :2] = 255
    return logits, labels


def numpy_softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_matches_numpy(gamma):
    logits, labels = random_logits_and_labels()
    p = numpy_softmax(logits.astype(np.float64))
    valid = labels != 255
    p_true = np.take_along_axis(p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    expected = np.where(valid, -((1 - p_true) ** gamma) * np.log(p_true), 0).sum() / valid.sum()
    got = losses.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), ignore_label=255, kind="focal", focal_gamma=gamma
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_unknown_loss_kind_is_an_error_naming_the_field():
    logits, labels = random_logits_and_labels()
    with pytest.raises(ValueError, match="loss.kind"):
        losses.segmentation_loss(logits, labels, ignore_label=255, kind="dice")


def test_mean_entropy_matches_numpy_and_its_bounds():
    logits, _ = random_logits_and_labels(seed=1)
    p = numpy_softmax(logits.astype(np.float64))
    expected = (-(p * np.log(p)).sum(-1)).mean() / np.log(5)
    np.testing.assert_allclose(float(losses.mean_entropy(jnp.asarray(logits))), expected, rtol=1e-5)
    assert float(losses.mean_entropy(jnp.zeros((1, 2, 2, 5)))) == pytest.approx(1.0)
    assert float(losses.mean_entropy(jnp.full((1, 1, 1, 3), -1e4).at[..., 0].set(1e4))) < 1e-6


def test_w19_with_equal_weights_reproduces_w1():
    logits, labels = random_logits_and_labels(seed=2)
    rng = np.random.default_rng(3)
    w1 = rng.uniform(size=labels.shape).astype(np.float32)
    w19 = np.repeat(w1[..., None], 5, axis=-1)
    kwargs = {"ignore_label": 255, "normalization": "all"}
    a = losses.segmentation_loss(logits, labels, weights=jnp.asarray(w1), **kwargs)
    b = losses.segmentation_loss(logits, labels, weights=jnp.asarray(w19), **kwargs)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


# ---- FDA ------------------------------------------------------------------------------------


def test_fda_swap_keeps_source_phase_and_takes_target_low_amplitude():
    rng = np.random.default_rng(4)
    source = rng.uniform(0, 255, (2, 12, 16, 3))
    target = rng.uniform(0, 255, (2, 12, 16, 3))
    out = np.asarray(fda.swap_low_amplitude(jnp.asarray(source), jnp.asarray(target), 0.25))
    f_out, f_src, f_trg = (np.fft.fft2(x, axes=(1, 2)) for x in (out, source, target))
    # b = floor(12 * 0.25) = 3: |ky| < 3 and |kx| < 3, i.e. rows/cols {0, 1, 2, -2, -1}.
    band = np.zeros((12, 16), bool)
    band[np.ix_([0, 1, 2, 10, 11], [0, 1, 2, 14, 15])] = True
    np.testing.assert_array_equal(fda.low_frequency_mask(12, 16, 0.25), band)
    np.testing.assert_allclose(np.abs(f_out)[:, band], np.abs(f_trg)[:, band], rtol=1e-3)
    np.testing.assert_allclose(np.abs(f_out)[:, ~band], np.abs(f_src)[:, ~band], rtol=1e-3)
    phase_diff = np.angle(f_out * np.conj(f_src))
    np.testing.assert_allclose(phase_diff, 0, atol=1e-3)


def test_fda_is_the_identity_at_beta_zero_and_checks_beta():
    rng = np.random.default_rng(5)
    source = rng.uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
    target = rng.uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
    out = fda.swap_low_amplitude(jnp.asarray(source), jnp.asarray(target), 0.0)
    np.testing.assert_allclose(np.asarray(out), source, atol=1e-3)
    with pytest.raises(ValueError, match="fda.beta"):
        fda.low_frequency_mask(8, 8, -0.1)


@pytest.mark.parametrize("normalization", ["imagenet", "caffe"])
def test_fda_stylize_moves_the_mean_colour_to_the_donor(normalization):
    """With only the DC term swapped (b = 1), each channel's mean becomes the donor's."""
    rng = np.random.default_rng(6)
    pixels_s = rng.uniform(60, 120, (2, 8, 8, 3)).astype(np.float32)
    pixels_t = rng.uniform(100, 160, (1, 8, 8, 3)).astype(np.float32)
    source = fda.from_pixels(jnp.asarray(pixels_s), normalization)
    target = fda.from_pixels(jnp.asarray(pixels_t), normalization)
    out = np.asarray(
        fda.to_pixels(fda.stylize(source, target, 0.125, normalization), normalization)
    )
    np.testing.assert_allclose(
        out.mean((1, 2)), np.broadcast_to(pixels_t.mean((1, 2)), (2, 3)), atol=0.05
    )
    centred = lambda x: x - x.mean((1, 2), keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centred(out), centred(pixels_s), atol=0.05)
    same = fda.stylize(source, target, 0.0, normalization)
    np.testing.assert_allclose(np.asarray(same), np.asarray(source), atol=1e-4)


# ---- HRSelect -------------------------------------------------------------------------------


def test_hrselect_distance_is_the_mean_over_all_source_target_pairs():
    rng = np.random.default_rng(7)
    w = rng.uniform(size=(2, 3, 4))
    xs, xt = rng.normal(size=(2, 3, 4, 3)), rng.normal(size=(3, 3, 4, 3))
    expected = np.mean(
        [np.mean((w[i, ..., None] * xs[i] - xt[j]) ** 2) for i in range(2) for j in range(3)]
    )
    got = hrselect.weighted_image_distance(jnp.asarray(w), jnp.asarray(xs), jnp.asarray(xt))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


# ---- steps and schedules --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = test_config.get_config()
    config.data.height, config.data.width = 16, 16
    mesh = parallel.make_mesh()
    return config, mesh, random_batch(config, mesh), all_steps(config, mesh)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, host(a), host(b))))


def test_finetune_phases_restart_the_weighted_optimiser_only_when_asked():
    """finetune = direct_joint unless optim.fresh_weighted_optimizer (then a fresh Adam)."""
    config = test_config.get_config()
    state = state_lib.init_state(config)
    moved = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    phase = schedule.Phase("finetune", 1, 3, 2)
    assert trees_equal(train.begin_phase(moved, phase, config).opt_state, moved.opt_state)
    config.optim.fresh_weighted_optimizer = True
    restarted = train.begin_phase(moved, phase, config).opt_state
    fresh = state_lib.segmenter_optimizer(config, weighted_phase=True).init(state.params)
    assert trees_equal(restarted, fresh)


def test_online_step_moves_both_networks_by_one_position(tiny):
    config, mesh, batch, step_fns = tiny
    before = host(fresh_state(config, mesh))
    after, metrics = step_fns["online"](fresh_state(config, mesh), batch)
    assert int(after.position) == 1 and int(after.step) == 1
    assert not trees_equal(before.params, after.params)
    assert not trees_equal(before.unet_params, after.unet_params)
    assert {"meta_grad_norm", "source_loss", "weight_mean"} <= set(metrics)


@pytest.mark.parametrize("kind", ["hrselect"])  # fda and minent: through main.py below.
def test_new_step_kinds_change_what_they_train(tiny, kind):
    config, mesh, batch, step_fns = tiny
    before = host(fresh_state(config, mesh))
    after, metrics = step_fns[kind](fresh_state(config, mesh), batch)
    assert int(after.position) == 1
    assert trees_equal(before.params, after.params) == (kind == "hrselect")
    assert trees_equal(before.unet_params, after.unet_params) == (kind != "hrselect")
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_phases_of_every_method():
    config = test_config.get_config()  # N1 = 3, N2 = 2, N3 = 2, G = 2.
    expected = {
        "finetune": ["joint", "finetune_gen1", "finetune_gen2"],
        "metapix_online": ["joint", "online_gen1", "online_gen2"],
        "hrselect": ["joint", "hrselect_gen1", "weighted_gen1", "hrselect_gen2", "weighted_gen2"],
        "fda": ["fda", "fda_gen1", "fda_gen2"],
        "minent": ["minent", "minent_gen1", "minent_gen2"],
    }
    for method, names in expected.items():
        config.method = method
        assert [p.name for p in schedule.phases(config)] == names, method
    config.method = "metapix_online"
    assert schedule.total_positions(config) == 3 + 2 * 2  # A position is a meta+weighted pair.


def test_compare_rejects_unknown_names_and_shares_pretraining_only_when_valid():
    config = test_config.get_config()
    config.model.split_block = 0  # So that metapix_k1 is a different segmenter.
    with pytest.raises(ValueError, match="compare_methods"):
        methods.resolve("metapixx")
    sig = {
        n: compare.joint_phase_signature(compare.method_config(config, n, "/tmp/x"))
        for n in (
            "direct_joint",
            "metapix_w19",
            "finetune",
            "hrselect",
            "focal",
            "metapix_k1",
            "fda",
        )
    }
    assert sig["metapix_w19"] == sig["finetune"] == sig["hrselect"] == sig["direct_joint"]
    assert sig["focal"] != sig["direct_joint"] and sig["metapix_k1"] != sig["direct_joint"]
    assert sig["fda"] is None


# ---- the oracle ------------------------------------------------------------------------------


def test_the_oracle_ignores_exactly_the_harmful_pixels(tmp_path):
    config = test_config.get_config()
    config.data.synthetic_root = str(tmp_path / "benchmark")
    plain = datasets.get_datasets(config, str(tmp_path), with_source=True)
    oracle = datasets.get_datasets(config, str(tmp_path), with_source=True, without_harm=True)
    changed = 0
    for i in range(len(plain.source)):
        image, label = plain.source.read(i)
        oracle_image, oracle_label = oracle.source.read(i)
        harmful = sources.read_mask(datasets.harmful_mask_path(plain.source.name(i)))
        np.testing.assert_array_equal(oracle_image, image)
        np.testing.assert_array_equal(oracle_label[~harmful], label[~harmful])
        assert np.all(oracle_label[harmful] == 255)
        changed += int((label[harmful] != 255).sum())
    assert changed > 0  # The benchmark has harmful labeled pixels: the test can see them.


def test_the_oracle_needs_the_embedded_benchmark(tmp_path):
    config = test_config.get_config()
    config.mode, config.method = "train", "oracle_mask"
    config.data.synthetic = False
    config.data.source_root = config.data.target_root = str(tmp_path)
    with pytest.raises(validation.ConfigError, match="'oracle_mask' needs the embedded"):
        validation.validate(config, str(tmp_path), devices=1)


# ---- results table --------------------------------------------------------------------------


def write_run(root, name, method, seed, miou, road, extra=None):
    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "eval"))
    config = {"method": method, "seed": seed, "weighting": {"kind": "w1"}, "log_every": seed}
    config.update(extra or {})
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    evaluation = {"miou": miou, "segmenter_steps": 10, "per_class_iou": {"road": road, "sky": None}}
    with open(os.path.join(run, "eval", "latest.json"), "w") as f:
        json.dump(evaluation, f)


def test_results_table_from_hand_written_runs(tmp_path):
    root = str(tmp_path)
    write_run(root, "s0/metapix", "metapix", 0, 0.30, 0.5)
    write_run(root, "s1/metapix", "metapix", 1, 0.34, 0.7)
    write_run(root, "s0/metapix_w19", "metapix", 0, 0.20, 0.4, {"weighting": {"kind": "w19"}})
    write_run(root, "s0/direct_joint", "direct_joint", 0, 0.25, 0.6, {"weighting": {}})
    table = results.results_table(root).splitlines()
    assert table[0].startswith(
        "| method | setting | seeds | segmenter steps | mIoU mean (sd) | road | sky |"
    )
    # Direct joint first (the paper's order; its config predates weighting.kind, so that is
    # no difference); MetaPix: mean 32.00, sd sqrt(8) = 2.83; log_every is no setting.
    assert table[2] == "| direct_joint | - | 1 | 10 | 25.00 (-) | 60.0 | - |"
    assert table[3] == "| metapix | - | 2 | 10 | 32.00 (2.83) | 60.0 | - |"
    assert table[4] == "| metapix | weighting.kind=w19 | 1 | 10 | 20.00 (-) | 40.0 | - |"
    results.print_results(root)  # The per-class table follows the summary in results.md.
    saved = open(os.path.join(root, "results.md")).read().splitlines()
    assert saved[-len(table) :] == table


def test_results_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(validation.ConfigError, match="no eval/latest.json"):
        results.results_table(str(tmp_path))


# ---- every method through main.py -----------------------------------------------------------

NEW_METHODS = (
    "direct_joint",
    "finetune",
    "metapix_w19",
    "metapix_online",
    "hrselect",
    "fda",
    "minent",
    "focal",
    "oracle_mask",
)


def test_every_new_method_trains_and_evaluates_through_main(tmp_path):
    workdir = str(tmp_path / "compare")
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--config.compare_methods={NEW_METHODS!r}",
        "--config.schedule.joint_steps=2",
        "--config.schedule.meta_steps=1",
        "--config.schedule.weighted_steps=1",
        "--config.schedule.generations=1",
        "--config.eval_at_phase_end=False",
        "--config.image_every=0",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compared = json.load(open(os.path.join(workdir, "compare.json")))
    assert set(compared) == set(NEW_METHODS)
    for name, r in compared.items():
        assert r["eval"]["segmenter_steps"] == 3, name  # N1 + G * N3.
    # finetune with the default optimiser is direct joint training: the same model.
    assert (
        compared["finetune"]["eval"]["per_class_iou"]
        == compared["direct_joint"]["eval"]["per_class_iou"]
    )
    for name in ("finetune", "metapix_w19", "metapix_online", "hrselect"):
        assert (
            f"[{methods.resolve(name)[0]}] its first 2 steps are direct_joint's joint phase"
            in proc.stdout
        )
        assert 0 <= r["eval"]["miou"] <= 1
    for name in ("fda", "direct_joint", "oracle_mask"):  # Another first phase: no reuse.
        assert f"[{name}] its first" not in proc.stdout, name
    assert "weights" in compared["hrselect"] and "weights" not in compared["fda"]
    table = run_main("--config=configs/test.py", f"--workdir={workdir}", "--config.mode=results")
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| metapix | weighting.kind=w19 | 1 | 3 |" in table.stdout
    assert "| direct_joint | loss.kind=focal | 1 | 3 |" in table.stdout
