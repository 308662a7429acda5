"""The segmenter's steps (Algorithms 1 and 3 and the baselines' variants) and inference.

Every segmenter step is one optimiser step on theta (`segmenter_update`) for a loss
L(theta) = [source term] + L_t: no source term (target only), the unweighted source loss
(joint, Algorithm 1 lines 8-13), or the source loss weighted by the frozen U-Net
(Algorithm 3). The FDA baseline restyles the source images first (fda.py); MinEnt adds
the entropy of the target predictions. Each step is a pure function
`(state, batch) -> (state, metrics)`; the training loop advances the schedule position.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from metapix_jax import fda, losses, parallel
from metapix_jax import state as state_lib
from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.resize import resize_bilinear_align_corners
from metapix_jax.models.unet import WeightingUNet
from metapix_jax.state import TrainState

Batch = dict[str, jnp.ndarray]
Metrics = dict[str, jnp.ndarray]
# A segmenter loss: (params, batch, dropout key) -> (loss, metrics).
LossFn = Callable[[Any, Batch, jax.Array], tuple[jnp.ndarray, Metrics]]


def step_key(state: TrainState) -> jax.Array:
    """The dropout key of the current step: a function of the seed and the position."""
    return jax.random.fold_in(state.rng, state.position)


def source_weights(unet: WeightingUNet, unet_params: Any, batch: Batch) -> jnp.ndarray:
    """W = f_phi(concat(x_s, y_s)) (Algorithm 2 line 3, Algorithm 3 line 3)."""
    return unet.apply({"params": unet_params}, batch["source_image"], batch["source_label"])


def weight_statistics(weights: jnp.ndarray, labels: jnp.ndarray, ignore_label: int) -> Metrics:
    """Mean and spread of the weights on labeled source pixels, for the logs."""
    w = losses.labeled_class_weight(weights, labels)
    valid = labels != ignore_label
    count = jnp.maximum(valid.sum(), 1)
    mean = jnp.where(valid, w, 0.0).sum() / count
    var = jnp.where(valid, (w - mean) ** 2, 0.0).sum() / count
    return {"weight_mean": mean, "weight_std": jnp.sqrt(var)}


def target_loss(logits_t: jnp.ndarray, batch: Batch, config: ml_collections.ConfigDict):
    """L_t: the mean per-pixel loss (loss.kind) over the labeled target pixels."""
    return losses.segmentation_loss(
        logits_t,
        batch["target_label"],
        ignore_label=config.data.ignore_label,
        normalization=config.loss.target_normalization,
        kind=config.loss.kind,
        focal_gamma=config.loss.focal_gamma,
    )


def source_loss(
    logits_s: jnp.ndarray,
    batch: Batch,
    config: ml_collections.ConfigDict,
    weights: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """L_s, or sum_hw W * loss_hw / (H W) with pixel weights (Eq. 1, loss.source_normalization),
    the weights normalised as weighting.normalization says (the meta step and the weighted
    step both come here, so the meta objective sees the weights the weighted step uses)."""
    if weights is not None:
        weights = losses.normalized_weights(
            weights,
            batch["source_label"],
            ignore_label=config.data.ignore_label,
            num_classes=config.data.num_classes,
            normalization=config.weighting.normalization,
        )
    return losses.segmentation_loss(
        logits_s,
        batch["source_label"],
        ignore_label=config.data.ignore_label,
        normalization=config.loss.source_normalization if weights is not None else "valid",
        weights=weights,
        kind=config.loss.kind,
        focal_gamma=config.loss.focal_gamma,
    )


def joint_loss(
    params: Any,
    batch: Batch,
    key: jax.Array,
    *,
    model: FCN8s,
    config: ml_collections.ConfigDict,
    with_source: bool = True,
    weights: jnp.ndarray | None = None,
    entropy_weight: float = 0.0,
) -> tuple[jnp.ndarray, Metrics]:
    """L_s + L_t (Alg. 1 line 12; Alg. 3 line 6 with `weights`), or L_t alone.

    With entropy_weight > 0 (MinEnt + supervision), + entropy_weight * H(target preds).
    """
    source = batch["source_image"] if with_source else None
    logits_s, logits_t = model.apply(
        {"params": params}, source, batch["target_image"], train=True, rngs={"dropout": key}
    )
    loss_t = target_loss(logits_t, batch, config)
    metrics = {"target_loss": loss_t}
    if entropy_weight:
        metrics["target_entropy"] = entropy = losses.mean_entropy(logits_t)
        loss_t = loss_t + entropy_weight * entropy
    if not with_source:
        return loss_t, metrics
    metrics["source_loss"] = loss_s = source_loss(logits_s, batch, config, weights)
    return loss_s + loss_t, metrics


def segmenter_update(
    state: TrainState, batch: Batch, loss_fn: LossFn, tx: optax.GradientTransformation
) -> tuple[TrainState, Metrics]:
    """One optimiser step on theta for `loss_fn`; nothing else in the state changes."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, step_key(state)
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}


def joint_step(state: TrainState, batch: Batch, *, model, tx, config) -> tuple[TrainState, Metrics]:
    """Algorithm 1, lines 8-13: a step on the unweighted L_s + L_t."""
    loss_fn = functools.partial(joint_loss, model=model, config=config)
    return segmenter_update(state, batch, loss_fn, tx)


def target_step(
    state: TrainState, batch: Batch, *, model, tx, config
) -> tuple[TrainState, Metrics]:
    """A step on L_t alone: the source images are never looked at."""
    loss_fn = functools.partial(joint_loss, model=model, config=config, with_source=False)
    return segmenter_update(state, batch, loss_fn, tx)


def weighted_step(
    state: TrainState, batch: Batch, *, model, unet, tx, config
) -> tuple[TrainState, Metrics]:
    """Algorithm 3: W from the frozen U-Net (no gradient reaches phi), a step on W L_s + L_t."""
    weights = jax.lax.stop_gradient(source_weights(unet, state.unet_params, batch))  # line 3
    stats = weight_statistics(weights, batch["source_label"], config.data.ignore_label)
    loss_fn = functools.partial(joint_loss, model=model, config=config, weights=weights)
    new_state, metrics = segmenter_update(state, batch, loss_fn, tx)  # lines 4-7
    return new_state, {**metrics, **stats}


def fda_step(state: TrainState, batch: Batch, *, model, tx, config) -> tuple[TrainState, Metrics]:
    """A joint step on source images restyled by the batch's target images (FDA)."""
    restyled = fda.stylize(
        batch["source_image"], batch["target_image"], config.fda.beta, config.data.normalization
    )
    return joint_step(state, {**batch, "source_image": restyled}, model=model, tx=tx, config=config)


def minent_step(
    state: TrainState, batch: Batch, *, model, tx, config
) -> tuple[TrainState, Metrics]:
    """A joint step with minent.weight x the entropy of the target predictions added."""
    loss_fn = functools.partial(
        joint_loss, model=model, config=config, entropy_weight=config.minent.weight
    )
    return segmenter_update(state, batch, loss_fn, tx)


def predict_logits(params: Any, images: jnp.ndarray, *, model: FCN8s) -> jnp.ndarray:
    """Target-branch logits (the test-time model), float32 NHWC."""
    _, logits = model.apply({"params": params}, None, images, train=False)
    return logits


def confusion_matrix(
    labels: jnp.ndarray, predictions: jnp.ndarray, num_classes: int, ignore_label: int
) -> jnp.ndarray:
    """[C, C] int32 counts, rows = ground truth, columns = prediction; ignores unlabeled."""
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.bincount(
        index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_classes**2
    )
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def confusion_counts(state: TrainState, batch: Batch, *, model: FCN8s, config) -> jnp.ndarray:
    """Confusion-matrix counts of one target batch, to be summed over the eval set.

    Labels larger than the images (data.eval_protocol='full') get the logits upsampled
    bilinearly (align corners, as the authors' code) to their size: the official protocol.
    """
    logits = predict_logits(state.params, batch["image"], model=model)
    logits = resize_bilinear_align_corners(logits, *batch["label"].shape[1:3])
    predictions = jnp.argmax(logits, axis=-1)
    return confusion_matrix(
        batch["label"], predictions, config.data.num_classes, config.data.ignore_label
    )


class Inference(NamedTuple):
    """Jitted test-time functions: what evaluation, summaries, compare and predict call."""

    predict: Callable[[TrainState, jax.Array], jax.Array]  # Images -> target logits.
    weights: Callable[[TrainState, Batch], jax.Array]  # Source batch -> per-pixel weights.
    confusion: Callable[[TrainState, Batch], jax.Array]  # Eval batch -> summed counts.


def make_inference(config: ml_collections.ConfigDict, mesh: Mesh) -> Inference:
    """The predict and weight functions of a config, jitted with the batch split over `mesh`."""
    model = state_lib.make_segmenter(config)
    unet = state_lib.make_weighting_net(config)

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        return predict_logits(state.params, images, model=model)

    def weights(state: TrainState, batch: Batch) -> jax.Array:
        w = source_weights(unet, state.unet_params, batch)
        return losses.labeled_class_weight(w, batch["source_label"])

    def confusion(state: TrainState, batch: Batch) -> jax.Array:
        return confusion_counts(state, batch, model=model, config=config)

    return Inference(
        predict=parallel.jit_split_output(predict, mesh),
        weights=parallel.jit_split_output(weights, mesh),
        confusion=parallel.jit_replicated_output(confusion, mesh),
    )
