"""Losses against hand computations; confusion matrix and mIoU on hand-made cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from metapix_jax import evaluate, losses
from metapix_jax.steps import confusion_matrix


def test_cross_entropy_with_ignore_label_by_hand():
    logits = np.array([[[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]]])
    labels = np.array([[[0, 255], [2, 1]]])
    ce, valid = losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255)
    lse = lambda v: np.log(np.exp(v).sum())  # noqa: E731
    expected = np.array([[[lse([2, 0, 0]) - 2, 0.0], [lse([0, 0, 3]) - 3, np.log(3)]]])
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    np.testing.assert_array_equal(valid, labels != 255)
    total = expected.sum()
    valid_mean = losses.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), ignore_label=255, normalization="valid"
    )
    all_mean = losses.segmentation_loss(
        jnp.asarray(logits), jnp.asarray(labels), ignore_label=255, normalization="all"
    )
    assert float(valid_mean) == pytest.approx(total / 3, rel=1e-6)
    assert float(all_mean) == pytest.approx(total / 4, rel=1e-6)


def test_pixel_weights_scale_each_pixel():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (2, 3, 4)))
    weights = jnp.asarray(rng.uniform(size=(2, 3, 4)), jnp.float32)
    ce, _ = losses.pixel_cross_entropy(logits, labels, 255)
    weighted = losses.segmentation_loss(
        logits, labels, ignore_label=255, normalization="all", weights=weights
    )
    assert float(weighted) == pytest.approx(float((ce * weights).sum() / 24), rel=1e-6)


def test_w19_with_equal_class_weights_reproduces_w1():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, 4, 19)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 19, (2, 3, 4))).at[0, 0, 0].set(255)
    w1 = jnp.asarray(rng.uniform(size=(2, 3, 4)), jnp.float32)
    w19 = jnp.repeat(w1[..., None], 19, axis=-1)
    kwargs = dict(ignore_label=255, normalization="all")
    a = losses.segmentation_loss(logits, labels, weights=w1, **kwargs)
    b = losses.segmentation_loss(logits, labels, weights=w19, **kwargs)
    assert float(a) == pytest.approx(float(b), rel=1e-7)


def test_w19_takes_the_weight_of_the_labeled_class():
    weights = jnp.zeros((1, 1, 2, 19)).at[0, 0, 0, 4].set(0.25).at[0, 0, 1, 7].set(0.5)
    labels = jnp.array([[[4, 7]]])
    np.testing.assert_allclose(losses.labeled_class_weight(weights, labels), [[[0.25, 0.5]]])


def test_unknown_normalization_is_an_error():
    with pytest.raises(ValueError, match="normalization"):
        losses.normalize(jnp.ones(()), jnp.ones((2, 2), bool), "mean")


def test_confusion_matrix_by_hand():
    labels = jnp.array([[0, 0, 1, 1, 2, 255]])
    predictions = jnp.array([[0, 1, 1, 1, 0, 2]])
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 4, 255), expected)


def test_miou_with_absent_classes_by_hand():
    # Rows = ground truth, columns = prediction.
    # Class 0: TP 3, FP 1 (a class-3 pixel), FN 1 (one predicted as 1) -> 3/5.
    # Class 1: TP 2, FP 1, FN 1 (one predicted as 4) -> 2/4.
    # Class 2 never occurs and is never predicted: NaN, left out of the mean.
    # Class 3 occurs once and is never predicted: TP 0 -> 0, counted.
    # Class 4 never occurs but is predicted once: TP 0, FP 1 -> 0, counted.
    confusion = np.array(
        [[3, 1, 0, 0, 0], [0, 2, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    )
    iou = evaluate.iou_per_class(confusion)
    np.testing.assert_allclose(iou[:2], [3 / 5, 2 / 4])
    assert np.isnan(iou[2]) and iou[3] == 0 and iou[4] == 0
    assert evaluate.mean_iou(confusion) == pytest.approx((3 / 5 + 2 / 4) / 4)
    result = evaluate.summarize(confusion, ["a", "b", "c", "d", "e"])
    assert result["per_class_iou"]["c"] is None and result["labeled_pixels"] == 8
