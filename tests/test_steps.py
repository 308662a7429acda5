"""What each step may and may not change, the losses it runs, and that no step retraces."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import all_steps, fresh_state, random_batch

from configs import test as test_config
from metapix_jax import losses, methods, nonfinite, parallel, steps
from metapix_jax import state as state_lib


@pytest.fixture(scope="module")
def setup():
    config = test_config.get_config()
    config.data.height, config.data.width = 16, 16
    mesh = parallel.make_mesh()
    return config, mesh, all_steps(config, mesh)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def assert_trees_differ(a, b):
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), host(a), host(b)))
    assert any(diffs)


def test_weighted_step_leaves_the_unet_unchanged(setup):
    config, mesh, step_fns = setup
    state = fresh_state(config, mesh)
    before = host(state)  # The step donates its input buffers: copy first.
    state, metrics = step_fns["weighted"](state, random_batch(config, mesh))
    assert_trees_equal(state.unet_params, before.unet_params)
    assert_trees_equal(state.unet_opt_state, before.unet_opt_state)
    assert_trees_differ(state.params, before.params)
    assert 0 < float(metrics["weight_mean"]) < 1
    assert int(state.step) == 1 and int(state.position) == 1


def test_meta_step_leaves_the_segmenter_unchanged(setup):
    config, mesh, step_fns = setup
    state = fresh_state(config, mesh)
    before = host(state)
    state, metrics = step_fns["meta"](state, random_batch(config, mesh))
    assert_trees_equal(state.params, before.params)
    assert_trees_equal(state.opt_state, before.opt_state)
    assert_trees_differ(state.unet_params, before.unet_params)
    assert float(metrics["meta_grad_norm"]) > 0
    assert int(state.step) == 0 and int(state.position) == 1


def test_source_loss_gives_no_gradient_to_the_target_copy(setup):
    config, _, _ = setup
    model = state_lib.make_segmenter(config)
    params = state_lib.init_segmenter_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 19, (2, 16, 16))).at[:, 0].set(255)

    def source_loss(p):
        logits, _ = model.apply({"params": p}, x, None)
        return steps.source_loss(logits, {"source_label": y}, config)

    grads = jax.grad(source_loss)(params)
    assert config.model.split_block >= 1
    for name in (f"target_block{i}" for i in range(1, config.model.split_block + 1)):
        assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[name]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["source_block1"]))


def test_joint_step_minimises_the_sum_of_both_losses(setup):
    """The joint step's reported losses are losses.py's mean cross-entropies of each domain."""
    config, mesh, step_fns = setup
    state = fresh_state(config, mesh)
    batch = random_batch(config, mesh)
    model = state_lib.make_segmenter(config)
    logits_s, logits_t = model.apply(
        {"params": state.params}, batch["source_image"], batch["target_image"], train=True,
        rngs={"dropout": steps.step_key(state)},
    )  # fmt: skip
    kwargs = {"ignore_label": 255, "normalization": "valid"}
    expected_s = losses.segmentation_loss(logits_s, batch["source_label"], **kwargs)
    expected_t = losses.segmentation_loss(logits_t, batch["target_label"], **kwargs)
    _, metrics = step_fns["joint"](state, batch)
    np.testing.assert_allclose(float(metrics["source_loss"]), float(expected_s), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["target_loss"]), float(expected_t), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected_s + expected_t), rtol=1e-5)


def test_joint_and_target_steps_train_only_the_segmenter(setup):
    config, mesh, step_fns = setup
    for kind in ("joint", "target"):
        state = fresh_state(config, mesh)
        before = host(state)
        state, metrics = step_fns[kind](state, random_batch(config, mesh))
        assert_trees_equal(state.unet_params, before.unet_params)
        assert_trees_differ(state.params, before.params)
        assert np.isfinite(float(metrics["loss"]))


def test_target_only_step_ignores_the_source(setup):
    config, mesh, step_fns = setup
    batch = random_batch(config, mesh)
    other = dict(batch, source_image=batch["source_image"] + 1.0)
    a, _ = step_fns["target"](fresh_state(config, mesh), batch)
    b, _ = step_fns["target"](fresh_state(config, mesh), other)
    assert_trees_equal(a.params, b.params)


def counting_traces(fn, counter: collections.Counter, name: str):
    """`fn`, counting in `counter[name]` how often JAX traces it (its Python body runs only
    while tracing)."""

    def traced(*args):
        counter[name] += 1
        return fn(*args)

    return traced


def test_no_step_retraces_after_its_first_call(setup):
    """Each step, wrapped as the loop wraps it, is traced once over several batches."""
    config, mesh, _ = setup
    parts = methods.step_parts(config)
    traces = collections.Counter()
    state = fresh_state(config, mesh)
    for kind in ("joint", "target", "weighted", "meta"):
        step = counting_traces(methods.make_step(kind, parts), traces, kind)
        jitted = parallel.jit_train_step(methods.advancing(nonfinite.guard(step, False)), mesh)
        for seed in range(3):
            state, _ = jitted(state, random_batch(config, mesh, seed))
    predict = parallel.jit_split_output(
        counting_traces(
            lambda s, x: steps.predict_logits(s.params, x, model=parts.model), traces, "predict"
        ),
        mesh,
    )
    for seed in range(2):
        predict(state, random_batch(config, mesh, seed)["target_image"])
    assert traces == {"joint": 1, "target": 1, "weighted": 1, "meta": 1, "predict": 1}
