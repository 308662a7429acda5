"""Per-pixel losses: cross-entropy (or focal loss) with an ignore label and pixel weights.

The paper's weighted source loss (Eq. 1, 8) is sum_hw W_hw * CE_hw / (H W): ignored
pixels count as zero in the sum and as pixels in the divisor ('all'). The target loss
divides by the number of labeled pixels ('valid'), as the authors' code does.
"""

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("all", "valid")
LOSS_KINDS = ("ce", "focal")
WEIGHT_NORMALIZATIONS = ("none", "batch", "class")


def pixel_cross_entropy(
    logits: jnp.ndarray, labels: jnp.ndarray, ignore_label: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns per-pixel cross-entropy [B, H, W] (0 where ignored) and the valid mask."""
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, ce, 0.0), valid


def pixel_focal_loss(
    logits: jnp.ndarray, labels: jnp.ndarray, ignore_label: int, gamma: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-pixel focal loss -(1 - p)^gamma log p (Lin et al. 2017) and the valid mask.

    Table 1's FCN+Focal Loss baseline: well-classified pixels count less, so the loss is
    dominated by the hard ones. gamma = 0 is cross-entropy.
    """
    ce, valid = pixel_cross_entropy(logits, labels, ignore_label)
    one_minus_p = -jnp.expm1(-ce)  # 1 - exp(-ce), accurate when p is close to 1.
    return jnp.where(valid, one_minus_p**gamma * ce, 0.0), valid


def pixel_loss(
    logits: jnp.ndarray, labels: jnp.ndarray, ignore_label: int, kind: str, gamma: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The per-pixel loss named by config.loss.kind ('ce' or 'focal')."""
    if kind == "ce":
        return pixel_cross_entropy(logits, labels, ignore_label)
    if kind == "focal":
        return pixel_focal_loss(logits, labels, ignore_label, gamma)
    raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {kind!r}")


def mean_entropy(logits: jnp.ndarray) -> jnp.ndarray:
    """Mean over pixels of the prediction entropy, divided by log(C) to lie in [0, 1].

    MinEnt's (AdvEnt, Vu et al. 2019) loss on target predictions; every pixel counts,
    labeled or not, as in the unsupervised setting it comes from.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    entropy = -(jnp.exp(log_p) * log_p).sum(axis=-1)
    return entropy.mean() / jnp.log(logits.shape[-1])


def labeled_class_weight(weights: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """W19 -> per-pixel weight: the weight of each pixel's labeled class.

    W1 weights ([B, H, W]) pass through unchanged. Ignored pixels get an arbitrary
    class's weight; their cross-entropy is zero anyway.
    """
    if weights.ndim == labels.ndim:
        return weights
    safe = jnp.clip(labels, 0, weights.shape[-1] - 1)
    return jnp.take_along_axis(weights, safe[..., None], axis=-1)[..., 0]


def normalized_weights(
    weights: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    ignore_label: int,
    num_classes: int,
    normalization: str,
) -> jnp.ndarray:
    """The U-Net's weights as the source loss uses them (config.weighting.normalization).

    'none' (the paper): unchanged. Then the weights set the scale of the whole source loss
    as well as the balance between its pixels, and where the meta-gradient finds nothing to
    single out, lowering every weight lowers the source loss's share of the training.
    'batch': per-pixel weights divided by their mean over the batch's labeled pixels (mean
    1, as learning-to-reweight (Ren et al. 2018) normalises its example weights): lowering
    some pixels raises the others, the source loss keeps direct joint training's scale.
    'class': the same per labeled class of the batch, so that the weights cannot change how
    much each class counts either (the class-prior push: the meta-gradient also favours
    whole classes the target loss wants more of), only which of a class's pixels count.
    Gradients flow through the means: the meta objective sees the weights as used.
    Returns [B, H, W] per-pixel weights, 0 on ignored pixels ('none': the input unchanged).
    """
    if normalization == "none":
        return weights
    if normalization not in WEIGHT_NORMALIZATIONS:
        raise ValueError(
            f"weighting.normalization must be one of {WEIGHT_NORMALIZATIONS}, got {normalization!r}"
        )
    w = labeled_class_weight(weights, labels)
    valid = labels != ignore_label
    w_valid = jnp.where(valid, w, 0.0)
    if normalization == "batch":
        mean = w_valid.sum() / jnp.maximum(valid.sum(), 1)
    else:
        index = jnp.where(valid, labels, num_classes).ravel()  # Ignored: one extra bin.
        bins = num_classes + 1
        sums = jax.ops.segment_sum(w_valid.ravel(), index, num_segments=bins)
        counts = jax.ops.segment_sum(valid.ravel().astype(w.dtype), index, num_segments=bins)
        mean = (sums / jnp.maximum(counts, 1))[index].reshape(w.shape)
    return jnp.where(valid, w / jnp.where(valid, mean, 1.0), 0.0)


def normalize(total: jnp.ndarray, valid: jnp.ndarray, normalization: str) -> jnp.ndarray:
    """Divides a summed loss by all pixels ('all') or by the labeled ones ('valid')."""
    if normalization == "all":
        return total / valid.size
    if normalization == "valid":
        return total / jnp.maximum(valid.sum(), 1)
    raise ValueError(f"loss normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def segmentation_loss(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    ignore_label: int,
    normalization: str = "valid",
    weights: jnp.ndarray | None = None,
    kind: str = "ce",
    focal_gamma: float = 2.0,
) -> jnp.ndarray:
    """Mean (optionally pixel-weighted) cross-entropy or focal loss over a batch; a scalar."""
    ce, valid = pixel_loss(logits, labels, ignore_label, kind, focal_gamma)
    if weights is not None:
        ce = ce * labeled_class_weight(weights, labels)
    return normalize(ce.sum(), valid, normalization)
