"""weighting.normalization: the U-Net's weights as the source loss uses them, with exact
numbers, the scale each mode removes, and one weighted step per mode."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from metapix_jax import losses, steps

IGNORE = 255
LABELS = jnp.asarray([[[0, 0, 1, IGNORE]]])  # One image of 1 x 4 pixels.
WEIGHTS = jnp.asarray([[[0.2, 0.6, 0.5, 0.9]]])


def normalized(weights, mode, labels=LABELS, num_classes=19):
    return np.asarray(
        losses.normalized_weights(
            weights, labels, ignore_label=IGNORE, num_classes=num_classes, normalization=mode
        )
    )


def test_batch_normalization_divides_by_the_mean_over_labeled_pixels():
    # Mean over the three labeled pixels: 1.3 / 3; the ignored pixel's weight becomes 0.
    expected = [0.2 * 3 / 1.3, 0.6 * 3 / 1.3, 0.5 * 3 / 1.3, 0.0]
    np.testing.assert_allclose(normalized(WEIGHTS, "batch")[0, 0], expected, rtol=1e-6)


def test_class_normalization_divides_by_the_mean_of_each_labeled_class():
    # Class 0: mean 0.4 -> 0.5, 1.5; class 1 alone: 1.0; ignored: 0.
    np.testing.assert_allclose(normalized(WEIGHTS, "class")[0, 0], [0.5, 1.5, 1.0, 0.0], rtol=1e-6)


def test_w19_weights_are_read_at_the_labeled_class_first():
    w19 = np.full((1, 1, 4, 19), 0.7, np.float32)
    w19[0, 0, :, 0] = [0.2, 0.6, 0.3, 0.3]  # Class 0's weights (pixels 0 and 1 are class 0).
    w19[0, 0, 2, 1] = 0.5  # Pixel 2 is class 1.
    np.testing.assert_allclose(
        normalized(jnp.asarray(w19), "class")[0, 0], [0.5, 1.5, 1.0, 0.0], rtol=1e-6
    )
    np.testing.assert_allclose(
        normalized(jnp.asarray(w19), "batch"), normalized(WEIGHTS, "batch"), rtol=1e-6
    )


def test_none_is_the_paper_and_unknown_modes_are_errors():
    np.testing.assert_array_equal(normalized(WEIGHTS, "none"), np.asarray(WEIGHTS))
    with pytest.raises(ValueError, match="weighting.normalization"):
        normalized(WEIGHTS, "mean")


def source_loss(weights, mode, labels, logits):
    config = test_config.get_config()
    config.weighting.normalization = mode
    config.loss.source_normalization = "valid"
    batch = {"source_label": labels}
    return float(steps.source_loss(logits, batch, config, weights))


@pytest.mark.parametrize("mode", ["batch", "class"])
def test_each_mode_removes_the_scale_it_claims(mode):
    """'batch': any common factor of the weights leaves the loss as unweighted training's;
    'class': so does any factor per class. 'none' keeps the factor (the paper)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 3, 5))
    labels[0, 0, :2] = IGNORE
    labels = jnp.asarray(labels)
    logits = jnp.asarray(rng.normal(size=(2, 3, 5, 19)), jnp.float32)
    unweighted = source_loss(jnp.ones(labels.shape), "none", labels, logits)
    per_class = jnp.asarray([0.3, 0.8, 0.1, 0.5])[jnp.clip(labels, 0, 3)]
    factor = {"batch": jnp.full(labels.shape, 0.3), "class": per_class}[mode]
    assert source_loss(factor, mode, labels, logits) == pytest.approx(unweighted, rel=1e-6)
    assert source_loss(factor, "none", labels, logits) < 0.9 * unweighted
    if mode == "batch":  # Not per class: a class factor changes the balance.
        changed = source_loss(per_class, "batch", labels, logits)
        assert changed != pytest.approx(unweighted, rel=1e-3)
