"""HRSelect-W1 (Sun et al. 2019): the weighting U-Net trained by a heuristic, not by meta.

MetaPix's closest competitor (Table 1, FCN+HRSelect-W1). The paper describes its
heuristic as "the weighted synthetic data should look similar to the real data",
implemented by minimising the L2 distance between the weighted synthetic data and the
real data. Here: the mean over pixels, channels and all (source, target) pairs of the
batch of (W * x_s - x_t)^2 on the normalised images, one Adam step on phi per step.
The segmenter is untouched; the weighted phases that follow are MetaPix's (Algorithm 3).
Nothing in this loss looks at the target labels: that is the difference being tested.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metapix_jax import losses
from metapix_jax.models.unet import WeightingUNet
from metapix_jax.state import TrainState
from metapix_jax.steps import Batch, Metrics, source_weights, weight_statistics


def weighted_image_distance(
    pixel_weights: jnp.ndarray, source: jnp.ndarray, target: jnp.ndarray
) -> jnp.ndarray:
    """Mean of (w * x_s - x_t)^2 over every (source, target) pair, pixel and channel.

    pixel_weights [Bs, H, W], source [Bs, H, W, C], target [Bt, H, W, C]; a scalar.
    """
    weighted = (pixel_weights[..., None] * source)[:, None]
    return jnp.mean((weighted - target[None]) ** 2)


def hrselect_loss(
    unet_params: Any, batch: Batch, *, unet: WeightingUNet, config: ml_collections.ConfigDict
) -> tuple[jnp.ndarray, Metrics]:
    """The heuristic's loss of phi; W19 uses each pixel's labeled-class weight."""
    weights = source_weights(unet, unet_params, batch)
    pixel_weights = losses.labeled_class_weight(weights, batch["source_label"])
    distance = weighted_image_distance(pixel_weights, batch["source_image"], batch["target_image"])
    stats = weight_statistics(weights, batch["source_label"], config.data.ignore_label)
    return distance, {"hrselect_l2": distance, **stats}


def hrselect_step(
    state: TrainState,
    batch: Batch,
    *,
    unet: WeightingUNet,
    unet_tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, Metrics]:
    """phi <- Adam step on the heuristic's loss; theta is left as it is (like a meta step)."""
    loss_fn = jax.value_and_grad(hrselect_loss, has_aux=True)
    (_, metrics), grads = loss_fn(state.unet_params, batch, unet=unet, config=config)
    updates, unet_opt_state = unet_tx.update(grads, state.unet_opt_state, state.unet_params)
    new_state = state.replace(
        unet_params=optax.apply_updates(state.unet_params, updates),
        unet_opt_state=unet_opt_state,
    )
    return new_state, {"hrselect_grad_norm": optax.tree.norm(grads), **metrics}
