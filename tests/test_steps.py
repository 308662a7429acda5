"""What each step may and may not change, and that no step retraces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import fresh_state, random_batch

from configs import test as test_config
from metapix_jax import parallel
from metapix_jax import state as state_lib


@pytest.fixture(scope="module")
def setup():
    config = test_config.get_config()
    config.data.height, config.data.width = 16, 16
    mesh = parallel.make_mesh()
    return config, mesh, parallel.make_steps(config, mesh)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def assert_trees_differ(a, b):
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), host(a), host(b)))
    assert any(diffs)


def test_weighted_step_leaves_the_unet_unchanged(setup):
    config, mesh, steps = setup
    state = fresh_state(config, mesh)
    before = host(state)  # The step donates its input buffers: copy first.
    state, metrics = steps.weighted(state, random_batch(config, mesh))
    assert_trees_equal(state.unet_params, before.unet_params)
    assert_trees_equal(state.unet_opt_state, before.unet_opt_state)
    assert_trees_differ(state.params, before.params)
    assert 0 < float(metrics["weight_mean"]) < 1
    assert int(state.step) == 1 and int(state.position) == 1


def test_meta_step_leaves_the_segmenter_unchanged(setup):
    config, mesh, steps = setup
    state = fresh_state(config, mesh)
    before = host(state)
    state, metrics = steps.meta(state, random_batch(config, mesh))
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
    y = jnp.asarray(rng.integers(0, 19, (2, 16, 16)))

    def source_loss(p):
        logits, _ = model.apply({"params": p}, x, None)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (y >= 0))

    grads = jax.grad(source_loss)(params)
    assert config.model.split_block >= 1
    for name in (f"target_block{i}" for i in range(1, config.model.split_block + 1)):
        assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[name]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["source_block1"]))


def test_joint_and_target_steps_train_only_the_segmenter(setup):
    config, mesh, steps = setup
    for step in (steps.joint, steps.target):
        state = fresh_state(config, mesh)
        before = host(state)
        state, metrics = step(state, random_batch(config, mesh))
        assert_trees_equal(state.unet_params, before.unet_params)
        assert_trees_differ(state.params, before.params)
        assert np.isfinite(float(metrics["loss"]))


def test_target_only_step_ignores_the_source(setup):
    config, mesh, steps = setup
    batch = random_batch(config, mesh)
    other = dict(batch, source_image=batch["source_image"] + 1.0)
    a, _ = steps.target(fresh_state(config, mesh), batch)
    b, _ = steps.target(fresh_state(config, mesh), other)
    assert_trees_equal(a.params, b.params)


def test_no_step_retraces_after_its_first_call(setup):
    config, mesh, steps = setup
    state = fresh_state(config, mesh)
    for name in ("joint", "target", "weighted", "meta"):
        fn = getattr(steps, name)
        for seed in range(3):
            state, _ = fn(state, random_batch(config, mesh, seed))
        assert fn._cache_size() == 1, name
    eval_batch = {"image": np.zeros((4, 16, 16, 3), np.float32), "label": np.zeros((4, 16, 16))}
    for _ in range(2):
        steps.eval(
            state,
            parallel.to_global({**eval_batch, "label": eval_batch["label"].astype(np.int32)}, mesh),
        )
    assert steps.eval._cache_size() == 1
