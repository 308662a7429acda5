"""FCN-8s on VGG-16 with the first k blocks split into a source and a target copy.

The split (paper Fig. 1c, Fig. 4) gives the source and the target images their own
first k VGG blocks; everything after is shared. Source images never pass through the
target copy, so the source loss gives it exactly zero gradient. At test time only the
target branch is used. A width multiplier and the fc6 kernel/padding are fields so that
tests and the CPU demo run the same code on tiny images.
"""

import flax.linen as nn
import jax.numpy as jnp

from metapix_jax.models.resize import resize_bilinear_align_corners

# (convolutions, channels) of the five VGG-16 blocks.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def max_pool_ceil(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/2 max-pooling with ceil mode: odd sizes keep their last row/column."""
    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, pad_h), (0, pad_w)))


class VGGBlock(nn.Module):
    """`num_convs` 3x3 conv + ReLU layers followed by a ceil-mode max-pool."""

    num_convs: int
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.num_convs):
            x = nn.Conv(
                self.channels,
                (3, 3),
                padding=1,
                dtype=self.dtype,
                kernel_init=nn.initializers.kaiming_normal(),
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(x)
        return max_pool_ceil(x)


class FCN8s(nn.Module):
    """FCN-8s; call with `source` and/or `target` images (NHWC) and get their logits.

    When both are given, the shared part runs once on their concatenation, which is
    what a joint step wants on an accelerator.
    """

    num_classes: int = 19
    width: float = 1.0
    fc_dim: int = 4096
    fc6_kernel: int = 7
    fc6_padding: str = "VALID"
    split_block: int = 1
    dropout: float = 0.5
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # Recompute each VGG block's activations in the backward pass.

    def setup(self) -> None:
        if not 0 <= self.split_block <= len(VGG16_BLOCKS):
            raise ValueError(f"model.split_block must be in 0..5, got {self.split_block}")
        blocks = [(n, max(1, int(round(c * self.width)))) for n, c in VGG16_BLOCKS]
        k = self.split_block
        block_class = nn.remat(VGGBlock) if self.remat else VGGBlock
        make = lambda i, name: block_class(*blocks[i], dtype=self.dtype, name=name)  # noqa: E731
        self.target_blocks = [make(i, f"target_block{i + 1}") for i in range(k)]
        self.source_blocks = [make(i, f"source_block{i + 1}") for i in range(k)]
        self.shared_blocks = [make(i, f"block{i + 1}") for i in range(k, len(blocks))]
        fc_channels = max(1, int(round(self.fc_dim * self.width)))
        conv = lambda c, size, name, **kw: nn.Conv(c, size, dtype=self.dtype, name=name, **kw)  # noqa: E731
        kernel = (self.fc6_kernel, self.fc6_kernel)
        self.fc6 = conv(fc_channels, kernel, "fc6", padding=self.fc6_padding)
        self.fc7 = conv(fc_channels, (1, 1), "fc7")
        self.drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2))  # channel dropout
        # The 8s decoder (class scores, their upsampling and sums) always runs in float32:
        # under bf16 it would round the logits to 8 bits of mantissa (and the bilinear
        # weights with them) for a few percent of the model's arithmetic.
        head_dtype = jnp.promote_types(self.dtype, jnp.float32)
        head = lambda name, **kw: nn.Conv(  # noqa: E731
            self.num_classes, (1, 1), dtype=head_dtype, name=name, **kw
        )
        zeros = nn.initializers.zeros
        self.score = head("score")
        self.score_pool4 = head("score_pool4", kernel_init=zeros)
        self.score_pool3 = head("score_pool3", kernel_init=zeros)

    def _own_blocks(self, x: jnp.ndarray, domain: str) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """Runs one domain's copy of the first k blocks; returns the activation and pools."""
        pooled = []
        for block in self.source_blocks if domain == "source" else self.target_blocks:
            x = block(x)
            pooled.append(x)
        return x, pooled

    def _shared(
        self, x: jnp.ndarray, pooled: list[jnp.ndarray], image_hw: tuple[int, int], train: bool
    ) -> jnp.ndarray:
        """Shared blocks, fc6/fc7 and the 8s decoder, after the domain-specific blocks."""
        pooled = list(pooled)
        for block in self.shared_blocks:
            x = block(x)
            pooled.append(x)
        pool3, pool4, pool5 = pooled[2], pooled[3], pooled[4]
        x = self.drop(nn.relu(self.fc6(pool5)), deterministic=not train)
        x = self.drop(nn.relu(self.fc7(x)), deterministic=not train)
        x = self.score(x)
        x = resize_bilinear_align_corners(x, *pool4.shape[1:3]) + self.score_pool4(pool4)
        x = resize_bilinear_align_corners(x, *pool3.shape[1:3]) + self.score_pool3(pool3)
        return resize_bilinear_align_corners(x, *image_hw)

    def __call__(
        self,
        source: jnp.ndarray | None = None,
        target: jnp.ndarray | None = None,
        *,
        train: bool = False,
    ) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
        """Returns (source logits, target logits), float32 NHWC; None for a missing input."""
        inputs = {d: x for d, x in (("source", source), ("target", target)) if x is not None}
        if not inputs:
            raise ValueError("FCN8s needs a source or a target batch")
        own = {d: self._own_blocks(x.astype(self.dtype), d) for d, x in inputs.items()}
        if len(own) == 2 and source.shape[1:] == target.shape[1:]:
            # One pass of the shared trunk over both domains, as one batch.
            (xs, pools_s), (xt, pools_t) = own["source"], own["target"]
            x = jnp.concatenate([xs, xt])
            pooled = [jnp.concatenate(pair) for pair in zip(pools_s, pools_t, strict=True)]
            logits = self._shared(x, pooled, source.shape[1:3], train)
            return logits[: source.shape[0]], logits[source.shape[0] :]
        out = {d: self._shared(*own[d], inputs[d].shape[1:3], train) for d in own}
        return out.get("source"), out.get("target")
