"""The weighting network f_phi: a U-Net from (source image, one-hot label) to weights.

W1 gives one weight per pixel, the second of two softmax outputs (= sigmoid(l1 - l0)),
as the authors' U-Net. W19 gives one weight per pixel and class, a sigmoid per class;
the loss takes the weight of the labeled class. Convolutions start at N(0, 0.01^2) and
the output bias of the "keep" logit at 1, so every weight starts at about 0.73.

Each 3x3 convolution keeps its bias, as the authors' U-Net, although the instance norm
after it removes any per-channel constant: those biases have a true gradient of zero and
move only by rounding noise that Adam rescales (in float32 by under 5e-4 on the demo, in
bf16 by up to 0.04). They stay, so that checkpoints keep the authors' parameter layout:
removing them changed the demo's result no more than other float-level changes do
(BENCHMARKS.md, "bf16").
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from metapix_jax.models.fcn8s import max_pool_ceil
from metapix_jax.models.resize import resize_bilinear_align_corners

WEIGHTING_KINDS = ("w1", "w19")


def normal_init(stddev: float):
    """N(0, stddev^2) kernels, the same bits whether initialised eagerly or under jit.

    Flax's `normal(stddev)` is `sqrt(2) * erfinv(u) * stddev`; under jit XLA folds the two
    constants into one product, which rounds differently in the last bit. The barrier keeps
    the multiplication apart, so a jitted initialisation gives exactly the eager one.
    """

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * stddev

    return init


class DoubleConv(nn.Module):
    """(3x3 conv -> instance norm without affine -> ReLU) twice; the first to `mid`."""

    channels: int
    init_std: float
    mid_channels: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i, channels in enumerate((self.mid_channels or self.channels, self.channels)):
            x = nn.Conv(
                channels,
                (3, 3),
                padding=1,
                dtype=self.dtype,
                kernel_init=normal_init(self.init_std),
                name=f"conv{i + 1}",
            )(x)
            x = nn.InstanceNorm(use_scale=False, use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(x)
        return x


def weighting_input(
    image: jnp.ndarray, label: jnp.ndarray, num_classes: int, ignore_label: int
) -> jnp.ndarray:
    """concat(image, one-hot label) with num_classes + 1 label channels (last = ignore)."""
    label = jnp.where(label == ignore_label, num_classes, label)
    one_hot = jax.nn.one_hot(label, num_classes + 1, dtype=image.dtype)
    return jnp.concatenate([image, one_hot], axis=-1)


class WeightingUNet(nn.Module):
    """U-Net with `depth` down-steps; returns weights in (0, 1), float32.

    Output shape: [B, H, W] for kind 'w1', [B, H, W, num_classes] for kind 'w19'.
    """

    num_classes: int = 19
    ignore_label: int = 255
    kind: str = "w1"
    base_channels: int = 64
    depth: int = 3
    init_bias: float = 1.0
    init_std: float = 0.01
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # Recompute each double conv's activations in the backward pass.

    def _channels(self, level: int) -> int:
        """64-128-256-256 for base 64 and depth 3: the deepest level keeps its input width."""
        return self.base_channels * 2 ** min(level, self.depth - 1)

    @nn.compact
    def __call__(self, image: jnp.ndarray, label: jnp.ndarray) -> jnp.ndarray:
        if self.kind not in WEIGHTING_KINDS:
            raise ValueError(f"weighting.kind must be 'w1' or 'w19', got {self.kind!r}")
        x = weighting_input(image, label, self.num_classes, self.ignore_label)

        block_class = nn.remat(DoubleConv) if self.remat else DoubleConv

        def conv(channels: int, name: str, mid: int | None = None) -> DoubleConv:
            return block_class(channels, self.init_std, mid, self.dtype, name=name)

        x = conv(self.base_channels, "inc")(x.astype(self.dtype))
        skips = []
        for level in range(1, self.depth + 1):
            skips.append(x)
            x = conv(self._channels(level), f"down{level}")(max_pool_ceil(x))
        for level in reversed(range(self.depth)):
            skip = skips[level]
            x = resize_bilinear_align_corners(x, *skip.shape[1:3])
            x = jnp.concatenate([skip, x], -1)
            # Up path as the authors' bilinear U-Net: the first conv halves the channels.
            out_channels = self._channels(max(level - 1, 0))
            x = conv(out_channels, f"up{self.depth - level}", x.shape[-1] // 2)(x)
        outputs = 2 if self.kind == "w1" else self.num_classes
        bias = self.init_bias

        def bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
            # W1: only the "keep" logit starts at init_bias; W19: every class does.
            start = jnp.zeros(shape, dtype)
            return start.at[1].set(bias) if outputs == 2 else start + bias

        logits = nn.Conv(  # float32 under bf16 too: the weights need more than 8 bits.
            outputs,
            (1, 1),
            dtype=jnp.promote_types(self.dtype, jnp.float32),
            kernel_init=normal_init(self.init_std),
            bias_init=bias_init,
            name="out",
        )(x)
        if self.kind == "w1":
            return jax.nn.softmax(logits, axis=-1)[..., 1]
        return jax.nn.sigmoid(logits)
