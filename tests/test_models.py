"""FCN-8s and U-Net shapes, the split, the starting weights and the resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.resize import align_corners_matrix, resize_bilinear_align_corners
from metapix_jax.models.unet import WeightingUNet


def tiny_fcn(**kwargs) -> FCN8s:
    args = dict(width=1 / 16, fc_dim=128, fc6_kernel=3, fc6_padding="SAME", split_block=1)
    return FCN8s(**{**args, **kwargs})


@pytest.mark.parametrize("height,width", [(37, 71), (33, 65), (16, 32), (5, 9)])
def test_fcn_logits_have_the_input_size_for_odd_sizes(height, width):
    model = tiny_fcn()
    source = jnp.ones((2, height, width, 3))
    target = jnp.ones((1, height, width, 3))
    params = model.init(jax.random.key(0), source, target)
    logits_s, logits_t = model.apply(params, source, target)
    assert logits_s.shape == (2, height, width, 19)
    assert logits_t.shape == (1, height, width, 19)


def test_fcn_with_the_papers_valid_fc6_on_an_odd_size():
    # pool5 of 97x161 is 4x6; a VALID 3x3 fc6 gives 2x4, upsampled back by the decoder.
    model = tiny_fcn(fc6_padding="VALID")
    x = jnp.ones((1, 97, 161, 3))
    params = model.init(jax.random.key(0), x, x)
    _, logits = model.apply(params, None, x)
    assert logits.shape == (1, 97, 161, 19)


@pytest.mark.parametrize("split", [0, 1, 3, 5])
def test_split_blocks_have_a_source_and_a_target_copy(split):
    model = tiny_fcn(split_block=split)
    x = jnp.ones((1, 32, 32, 3))
    names = set(model.init(jax.random.key(0), x, x)["params"])
    for i in range(1, 6):
        if i <= split:
            assert {f"source_block{i}", f"target_block{i}"} <= names and f"block{i}" not in names
        else:
            assert f"block{i}" in names and f"source_block{i}" not in names


def test_split_block_out_of_range_is_a_clear_error():
    x = jnp.ones((1, 32, 32, 3))
    with pytest.raises(ValueError, match="split_block"):
        tiny_fcn(split_block=6).init(jax.random.key(0), x, x)


def test_joint_forward_equals_separate_forwards():
    # The shared trunk runs once on the concatenated batch: it must not mix the domains.
    model = tiny_fcn()
    rng = np.random.default_rng(0)
    xs, xt = (jnp.asarray(rng.normal(size=(2, 20, 28, 3)), jnp.float32) for _ in range(2))
    params = model.init(jax.random.key(0), xs, xt)
    joint_s, joint_t = model.apply(params, xs, xt)
    alone_s, _ = model.apply(params, xs, None)
    _, alone_t = model.apply(params, None, xt)
    np.testing.assert_allclose(joint_s, alone_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(joint_t, alone_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,shape", [("w1", (2, 19, 27)), ("w19", (2, 19, 27, 19))])
def test_unet_starts_at_about_0_73(kind, shape):
    model = WeightingUNet(kind=kind, base_channels=4)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(2, 19, 27, 3)), jnp.float32)
    label = jnp.asarray(rng.integers(0, 19, (2, 19, 27)))
    label = label.at[0, 0].set(255)
    weights = model.apply(model.init(jax.random.key(0), image, label), image, label)
    assert weights.shape == shape
    assert float(weights.mean()) == pytest.approx(1 / (1 + np.exp(-1)), abs=0.01)
    assert float(weights.min()) > 0 and float(weights.max()) < 1


def test_unet_has_the_authors_parameter_count():
    # 3 down-steps, 64-128-256-256, 23 input channels: about 4.29M parameters.
    model = WeightingUNet()
    image, label = jnp.ones((1, 64, 64, 3)), jnp.zeros((1, 64, 64), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, label))
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert count == pytest.approx(4.29e6, rel=0.01)


def test_fcn_has_the_vgg16_parameter_count():
    model = FCN8s(split_block=0)
    x = jnp.ones((1, 224, 224, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == pytest.approx(134.4e6, rel=0.001)


def test_align_corners_resize_against_a_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)
    out = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), 7, 9))
    expected = np.zeros((1, 7, 9, 2))
    for i in range(7):
        for j in range(9):
            y, xx = i * 3 / 6, j * 4 / 8
            y0, x0 = int(np.floor(y)), int(np.floor(xx))
            y1, x1 = min(y0 + 1, 3), min(x0 + 1, 4)
            fy, fx = y - y0, xx - x0
            expected[0, i, j] = (
                (1 - fy) * (1 - fx) * x[0, y0, x0]
                + (1 - fy) * fx * x[0, y0, x1]
                + fy * (1 - fx) * x[0, y1, x0]
                + fy * fx * x[0, y1, x1]
            )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Corners map onto corners.
    np.testing.assert_allclose(out[0, [0, -1]][:, [0, -1]], x[0, [0, -1]][:, [0, -1]], rtol=1e-6)


def test_align_corners_matrix_rows_sum_to_one():
    for out_size, in_size in [(1, 5), (5, 1), (8, 3), (3, 8)]:
        np.testing.assert_allclose(align_corners_matrix(out_size, in_size).sum(1), 1.0)
