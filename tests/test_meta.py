"""The meta-gradient (Algorithm 2) against central finite differences, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from metapix_jax import meta
from metapix_jax import state as state_lib


def tiny_config(kind: str, inner: str = "sgd", normalization: str = "none"):
    config = test_config.get_config()
    config.weighting.normalization = normalization
    config.data.height, config.data.width = 8, 16
    config.model.width = 1 / 32
    config.model.fc_dim = 64
    config.model.dropout = 0.0  # Dropout would make the loss a different function per call.
    config.weighting.kind = kind
    config.weighting.base_channels = 2
    config.weighting.depth = 2
    config.weighting.init_std = 0.3  # Larger weights: a gradient well above round-off.
    config.meta.inner_optimizer = inner
    config.meta.inner_learning_rate = 0.5
    return config


def random_batch(seed: int, config):
    rng = np.random.default_rng(seed)
    h, w = config.data.height, config.data.width
    labels = rng.integers(0, config.data.num_classes, (2, 2, h, w))
    labels[0, :, 0, :3] = config.data.ignore_label  # Some ignored pixels.
    return {
        "source_image": jnp.asarray(rng.normal(size=(2, h, w, 3))),
        "source_label": jnp.asarray(labels[0], jnp.int32),
        "target_image": jnp.asarray(rng.normal(size=(2, h, w, 3))),
        "target_label": jnp.asarray(labels[1], jnp.int32),
    }


def as_float64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def moved_optimizer_state(config, params, steps: int = 3):
    """The segmenter optimiser's state after a few updates with random gradients: moments
    and a count that are not the initial ones (what the Adam inner step starts from)."""
    tx = state_lib.segmenter_optimizer(config, weighted_phase=True)
    opt_state = tx.init(params)
    rng = np.random.default_rng(4)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        _, opt_state = tx.update(grads, opt_state, params)
    return opt_state


# Adam's step g / (|g| + eps) bends sharply where gradients are tiny, so central
# differences carry a larger O(eps^2) error there: a looser tolerance, not a weaker test.
# The normalised weights (weighting.normalization) are part of the meta objective.
@pytest.mark.parametrize(
    "kind,inner,rel,normalization",
    [
        ("w1", "sgd", 1e-6, "none"),
        ("w19", "sgd", 1e-6, "none"),
        ("w1", "adam", 1e-3, "none"),
        ("w1", "sgd", 1e-6, "batch"),
        ("w19", "sgd", 1e-6, "class"),
    ],
)
def test_meta_gradient_matches_finite_differences(kind, inner, rel, normalization):
    config = tiny_config(kind, inner, normalization)
    with jax.enable_x64(True):
        seg = as_float64(state_lib.init_segmenter_params(config, jax.random.key(0)))
        phi = as_float64(state_lib.init_weighting_params(config, jax.random.key(1)))
        state = state_lib.TrainState(
            params=seg,
            opt_state=moved_optimizer_state(config, seg),
            unet_params=phi,
            unet_opt_state=None,
            rng=jax.random.key_data(jax.random.key(2)),
            step=jnp.int32(3),
            position=jnp.int32(5),
        )
        batch = random_batch(0, config)
        loss = functools.partial(
            meta.meta_loss,
            state=state,
            batch=batch,
            model=state_lib.make_segmenter(config).clone(dtype=jnp.float64),
            unet=state_lib.make_weighting_net(config).clone(dtype=jnp.float64),
            inner=meta.inner_step(config),
            config=config,
        )
        value = jax.jit(lambda p: loss(p)[0])
        grad = jax.jit(jax.grad(lambda p: loss(p)[0]))(phi)
        flat_grad, unravel = jax.flatten_util.ravel_pytree(grad)
        assert float(jnp.linalg.norm(flat_grad)) > 1e-6, "meta-gradient vanished: test is blind"
        rng = np.random.default_rng(3)
        eps = 1e-5
        for _ in range(4):
            direction = rng.normal(size=flat_grad.shape)
            direction /= np.linalg.norm(direction)
            step = unravel(jnp.asarray(eps * direction))
            plus = jax.tree.map(jnp.add, phi, step)
            minus = jax.tree.map(jnp.subtract, phi, step)
            numeric = (float(value(plus)) - float(value(minus))) / (2 * eps)
            analytic = float(jnp.dot(flat_grad, direction))
            assert analytic == pytest.approx(numeric, rel=10 * rel, abs=1e-10)
        # Along the gradient itself the directional derivative is large: a sharper check.
        direction = np.asarray(flat_grad) / np.linalg.norm(flat_grad)
        step = unravel(jnp.asarray(eps * direction))
        numeric = (
            float(value(jax.tree.map(jnp.add, phi, step)))
            - float(value(jax.tree.map(jnp.subtract, phi, step)))
        ) / (2 * eps)
        assert numeric == pytest.approx(float(jnp.linalg.norm(flat_grad)), rel=rel)


def test_adam_inner_step_is_the_update_the_next_weighted_step_makes():
    """theta+ of the Adam inner step equals the segmenter optimiser's real update from the
    state's own moments and count, on the weighted source loss (not a fresh Adam's)."""
    config = tiny_config("w1", "adam")
    config.optim.weight_decay = 0.0  # Makes no difference to the claim; keeps it exact.
    params = state_lib.init_segmenter_params(config, jax.random.key(0))
    opt_state = moved_optimizer_state(config, params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)
    inner = meta.inner_step(config)
    assert inner.from_segmenter_state
    inner_updates, _ = inner.tx.update(grads, opt_state, params)
    real = state_lib.segmenter_optimizer(config, weighted_phase=True)
    real_updates, _ = real.update(grads, opt_state, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12),
        inner_updates,
        real_updates,
    )
    fresh_updates, _ = real.update(grads, real.init(params), params)
    differs = jax.tree.map(
        lambda a, b: bool(np.any(np.abs(a - b) > 1e-9)), inner_updates, fresh_updates
    )
    assert any(jax.tree.leaves(differs)), "the moments made no difference: test is blind"
