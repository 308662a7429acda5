"""The meta step: Algorithm 2 of the paper, a gradient through a gradient.

`meta_loss` is Loss^t(phi) of Eq. 4, lines 3-7 of Algorithm 2: the pixel weights, the
weighted source loss, one differentiable inner step on the segmenter, and the target
loss under the stepped segmenter. `meta_step` is line 8: `jax.grad` of it with respect
to phi alone (Eq. 5) and an Adam step on phi. The segmenter is not changed by a meta
step. The shape follows optax's meta-learning example: the inner optimiser's
`update` and `apply_updates` run inside the function that `jax.grad` differentiates.
"""

import dataclasses
from typing import Any

import jax
import ml_collections
import optax

from metapix_jax import state as state_lib
from metapix_jax import steps
from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.unet import WeightingUNet
from metapix_jax.state import TrainState

INNER_OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class InnerStep:
    """Line 6's optimiser, and whether it starts from the segmenter's own optimiser state."""

    tx: optax.GradientTransformation
    from_segmenter_state: bool


def inner_step(config: ml_collections.ConfigDict) -> InnerStep:
    """The differentiable inner step that meta.inner_optimizer names.

    'sgd' (the paper): theta+ = theta - alpha g, alpha = meta.inner_learning_rate.
    'adam': the update the next weighted step would really make, i.e. the segmenter's
    weighted-phase optimiser from its current moments and count (or from a fresh state
    when optim.fresh_weighted_optimizer restarts it); meta.inner_learning_rate is unused.
    """
    m = config.meta
    if m.inner_optimizer == "sgd":
        return InnerStep(optax.sgd(m.inner_learning_rate), from_segmenter_state=False)
    if m.inner_optimizer == "adam":
        # eps_root keeps the square root differentiable where a second moment is zero.
        tx = state_lib.segmenter_optimizer(config, weighted_phase=True, eps_root=1e-16)
        return InnerStep(tx, from_segmenter_state=not config.optim.fresh_weighted_optimizer)
    raise ValueError(
        f"meta.inner_optimizer must be one of {INNER_OPTIMIZERS}, got {m.inner_optimizer!r}"
    )


def meta_loss(
    unet_params: Any,
    state: TrainState,
    batch: steps.Batch,
    *,
    model: FCN8s,
    unet: WeightingUNet,
    inner: InnerStep,
    config: ml_collections.ConfigDict,
    weights: jax.Array | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, steps.Metrics]:
    """Lines 3-7: Loss^t(phi), the target loss after one step on the W-weighted source loss.

    For the benchmarks: `weights` replaces line 3's W (they differentiate with respect to W
    itself), `key` the step's dropout key.
    """
    if weights is None:
        weights = steps.source_weights(unet, unet_params, batch)  # line 3: W = f_phi(x_s, y_s)
    source_key, target_key = jax.random.split(steps.step_key(state) if key is None else key)

    def weighted_source_loss(params: Any) -> jax.Array:  # line 4: L_s(theta, W)
        logits_s, _ = model.apply(
            {"params": params}, batch["source_image"], None, train=True,
            rngs={"dropout": source_key},
        )  # fmt: skip
        return steps.source_loss(logits_s, batch, config, weights)

    source_loss, grads = jax.value_and_grad(weighted_source_loss)(state.params)  # line 5: g
    opt_state = state.opt_state if inner.from_segmenter_state else inner.tx.init(state.params)
    updates, _ = inner.tx.update(grads, opt_state, state.params)
    stepped = optax.apply_updates(state.params, updates)  # line 6: theta+
    _, logits_t = model.apply(
        {"params": stepped}, None, batch["target_image"], train=True,
        rngs={"dropout": target_key},
    )  # fmt: skip
    target_loss = steps.target_loss(logits_t, batch, config)  # line 7: L_t(theta+)
    metrics = {
        "meta_source_loss": source_loss,
        **steps.weight_statistics(weights, batch["source_label"], config.data.ignore_label),
    }
    return target_loss, metrics


def meta_step(
    state: TrainState,
    batch: steps.Batch,
    *,
    model: FCN8s,
    unet: WeightingUNet,
    inner: InnerStep,
    unet_tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, steps.Metrics]:
    """Line 8: phi <- Adam step on dLoss^t/dphi (Eq. 5); theta is left as it is."""
    loss_and_grad = jax.value_and_grad(meta_loss, has_aux=True)
    (target_loss, metrics), meta_grads = loss_and_grad(
        state.unet_params, state, batch, model=model, unet=unet, inner=inner, config=config
    )
    updates, unet_opt_state = unet_tx.update(meta_grads, state.unet_opt_state, state.unet_params)
    new_state = state.replace(
        unet_params=optax.apply_updates(state.unet_params, updates),
        unet_opt_state=unet_opt_state,
    )
    metrics = {
        "meta_target_loss": target_loss,
        "meta_grad_norm": optax.tree.norm(meta_grads),
        **metrics,
    }
    return new_state, metrics
