"""The meta step: Algorithm 2 of the paper, a gradient through a gradient.

`target_loss_after_inner_step` is Loss^t(phi) of Eq. 4: it computes the pixel weights,
the weighted source loss, one differentiable inner optimiser step on the segmenter, and
the target loss under the stepped segmenter. `jax.grad` of it with respect to phi alone
is the meta-gradient of Eq. 5. The segmenter itself is not changed by a meta step.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metapix_jax import losses
from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.unet import WeightingUNet
from metapix_jax.state import TrainState
from metapix_jax.steps import (
    Batch,
    Metrics,
    segmenter_step,
    source_weights,
    step_key,
    weight_statistics,
)


def target_loss_given_weights(
    weights: jnp.ndarray,
    seg_params: Any,
    batch: Batch,
    key: jax.Array,
    *,
    model: FCN8s,
    inner_tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Lines 4-7 of Algorithm 2 for given pixel weights W: (L_t(theta+(W)), L_s(theta, W))."""
    d = config.data
    source_key, target_key = jax.random.split(key)

    def weighted_source_loss(params: Any) -> jnp.ndarray:  # line 4: L_s(theta, W)
        logits, _ = model.apply(
            {"params": params}, batch["source_image"], None, train=True,
            rngs={"dropout": source_key},
        )  # fmt: skip
        return losses.segmentation_loss(
            logits,
            batch["source_label"],
            ignore_label=d.ignore_label,
            normalization=config.loss.source_normalization,
            weights=weights,
        )

    source_loss, grads = jax.value_and_grad(weighted_source_loss)(seg_params)  # line 5: g
    updates, _ = inner_tx.update(grads, inner_tx.init(seg_params), seg_params)
    stepped_params = optax.apply_updates(seg_params, updates)  # line 6: theta+
    _, logits_t = model.apply(
        {"params": stepped_params}, None, batch["target_image"], train=True,
        rngs={"dropout": target_key},
    )  # fmt: skip
    target_loss = losses.segmentation_loss(  # line 7: L_t(theta+)
        logits_t,
        batch["target_label"],
        ignore_label=d.ignore_label,
        normalization=config.loss.target_normalization,
    )
    return target_loss, source_loss


def target_loss_after_inner_step(
    unet_params: Any,
    seg_params: Any,
    batch: Batch,
    key: jax.Array,
    *,
    model: FCN8s,
    unet: WeightingUNet,
    inner_tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[jnp.ndarray, Metrics]:
    """Loss^t(phi) of Eq. 4: the target loss after one weighted source step from theta."""
    weights = source_weights(unet, unet_params, batch)  # line 3: W(phi)
    target_loss, source_loss = target_loss_given_weights(
        weights, seg_params, batch, key, model=model, inner_tx=inner_tx, config=config
    )
    metrics = {
        "meta_source_loss": source_loss,
        **weight_statistics(weights, batch["source_label"], config.data.ignore_label),
    }
    return target_loss, metrics


def meta_step(
    state: TrainState,
    batch: Batch,
    *,
    model: FCN8s,
    unet: WeightingUNet,
    inner_tx: optax.GradientTransformation,
    unet_tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, Metrics]:
    """Algorithm 2: phi <- Adam step on dLoss^t/dphi; theta is left as it is."""
    meta_loss = jax.value_and_grad(target_loss_after_inner_step, has_aux=True)
    (target_loss, metrics), meta_grads = meta_loss(
        state.unet_params,
        state.params,
        batch,
        step_key(state),
        model=model,
        unet=unet,
        inner_tx=inner_tx,
        config=config,
    )
    updates, unet_opt_state = unet_tx.update(meta_grads, state.unet_opt_state, state.unet_params)
    new_state = state.replace(  # line 8
        unet_params=optax.apply_updates(state.unet_params, updates),
        unet_opt_state=unet_opt_state,
        position=state.position + 1,
    )
    metrics = {
        "meta_target_loss": target_loss,
        "meta_grad_norm": optax.tree.norm(meta_grads),
        **metrics,
    }
    return new_state, metrics


def online_step(
    state: TrainState,
    batch: Batch,
    *,
    model: FCN8s,
    unet: WeightingUNet,
    inner_tx: optax.GradientTransformation,
    unet_tx: optax.GradientTransformation,
    seg_tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, Metrics]:
    """Online MetaPix: a meta step on phi, then a weighted step on theta, on the same batch.

    One schedule position per pair, so the weighted phases keep MetaPix's N3 segmenter
    steps while phi follows theta step by step instead of being learned before it moves.
    The same batch serves both halves (the weights are those just updated on it); the
    meta half draws its dropout from a separate key so that no mask is used twice.
    """
    meta_rng = jax.random.fold_in(state.rng, 1)
    meta_state, meta_metrics = meta_step(
        state.replace(rng=meta_rng),
        batch,
        model=model,
        unet=unet,
        inner_tx=inner_tx,
        unet_tx=unet_tx,
        config=config,
    )
    new_state, metrics = segmenter_step(
        meta_state.replace(rng=state.rng, position=state.position),
        batch,
        model=model,
        unet=unet,
        tx=seg_tx,
        config=config,
        source_term="weighted",
    )
    return new_state, {**meta_metrics, **metrics}
