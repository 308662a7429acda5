"""Segmenter steps (Algorithms 1 and 3) and the evaluation step.

Each step is a pure function `(state, batch) -> (state, metrics)`; `make_steps` binds the
models and the config and jits them. The methods differ only in the source term of the
loss: none (target only), unweighted (joint) or weighted by the frozen U-Net (Alg. 3);
the FDA baseline restyles the source images first (fda.py) and the MinEnt baseline adds
the entropy of the target predictions.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from metapix_jax import fda, losses
from metapix_jax.models.fcn8s import FCN8s
from metapix_jax.models.resize import resize_bilinear_align_corners
from metapix_jax.models.unet import WeightingUNet
from metapix_jax.state import TrainState

Batch = dict[str, jnp.ndarray]
Metrics = dict[str, jnp.ndarray]
SOURCE_TERMS = ("none", "unweighted", "weighted")


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


def segmenter_loss(
    params: Any,
    batch: Batch,
    key: jax.Array,
    *,
    model: FCN8s,
    config: ml_collections.ConfigDict,
    source_term: str,
    weights: jnp.ndarray | None,
    entropy_weight: float = 0.0,
) -> tuple[jnp.ndarray, Metrics]:
    """L = L_s + L_t (Alg. 1 line 12, Alg. 3 line 6), L_s absent for target-only.

    With entropy_weight > 0 (MinEnt + supervision), + entropy_weight * H(target preds).
    """
    d, loss_cfg = config.data, config.loss
    source = batch["source_image"] if source_term != "none" else None
    logits_s, logits_t = model.apply(
        {"params": params}, source, batch["target_image"], train=True, rngs={"dropout": key}
    )
    kind = {"kind": loss_cfg.kind, "focal_gamma": loss_cfg.focal_gamma}
    loss_t = losses.segmentation_loss(
        logits_t,
        batch["target_label"],
        ignore_label=d.ignore_label,
        normalization=loss_cfg.target_normalization,
        **kind,
    )
    metrics = {"target_loss": loss_t}
    if entropy_weight:
        metrics["target_entropy"] = entropy = losses.mean_entropy(logits_t)
        loss_t = loss_t + entropy_weight * entropy
    if source_term == "none":
        return loss_t, metrics
    loss_s = losses.segmentation_loss(
        logits_s,
        batch["source_label"],
        ignore_label=d.ignore_label,
        normalization=loss_cfg.source_normalization if weights is not None else "valid",
        weights=weights,
        **kind,
    )
    metrics["source_loss"] = loss_s
    return loss_s + loss_t, metrics


def fda_batch(batch: Batch, config: ml_collections.ConfigDict) -> Batch:
    """The batch with its source images restyled by its target images (FDA)."""
    restyled = fda.stylize(
        batch["source_image"], batch["target_image"], config.fda.beta, config.data.normalization
    )
    return {**batch, "source_image": restyled}


def segmenter_step(
    state: TrainState,
    batch: Batch,
    *,
    model: FCN8s,
    unet: WeightingUNet,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    source_term: str,
    restyle_source: bool = False,
    entropy_weight: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """One optimiser step on theta; the U-Net (if used) is frozen: no gradient reaches it.

    restyle_source: FDA's source images (fda.py); entropy_weight: MinEnt's target term.
    """
    if source_term not in SOURCE_TERMS:
        raise ValueError(f"source_term must be one of {SOURCE_TERMS}, got {source_term!r}")
    if restyle_source:
        batch = fda_batch(batch, config)
    weights = None
    extra = {}
    if source_term == "weighted":
        weights = jax.lax.stop_gradient(source_weights(unet, state.unet_params, batch))
        extra = weight_statistics(weights, batch["source_label"], config.data.ignore_label)
    loss_fn = functools.partial(
        segmenter_loss,
        model=model,
        config=config,
        source_term=source_term,
        weights=weights,
        entropy_weight=entropy_weight,
    )
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, step_key(state)
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
        position=state.position + 1,
    )
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        **metrics,
        **extra,
    }
    return new_state, metrics


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


def predict(state: TrainState, images: jnp.ndarray, *, model: FCN8s) -> jnp.ndarray:
    """Target-branch logits (the test-time model), float32 NHWC."""
    _, logits = model.apply({"params": state.params}, None, images, train=False)
    return logits


def eval_step(
    state: TrainState, batch: Batch, *, model: FCN8s, config: ml_collections.ConfigDict
) -> jnp.ndarray:
    """Confusion-matrix counts of one target batch, to be summed over the eval set.

    Labels larger than the images (data.eval_protocol='full') get the logits upsampled
    bilinearly (align corners, as the authors' code) to their size: the official protocol.
    """
    logits = predict(state, batch["image"], model=model)
    logits = resize_bilinear_align_corners(logits, *batch["label"].shape[1:3])
    predictions = jnp.argmax(logits, axis=-1)
    return confusion_matrix(
        batch["label"], predictions, config.data.num_classes, config.data.ignore_label
    )


class Steps(NamedTuple):
    """The jitted step functions of one configuration, one per phase kind (schedule.py)."""

    joint: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    target: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    weighted: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    meta: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    eval: Callable[[TrainState, Batch], jnp.ndarray]
    predict: Callable[[TrainState, jnp.ndarray], jnp.ndarray]
    weights: Callable[[TrainState, Batch], jnp.ndarray]
    finetune: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # Unweighted, Alg. 3's tx.
    online: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # Meta then weighted.
    hrselect: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # U-Net by heuristic.
    fda: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # Joint, restyled source.
    minent: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # Joint + target entropy.
