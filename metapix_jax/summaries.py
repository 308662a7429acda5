"""What a run writes to TensorBoard besides evaluations: interval averages and images.

The jitted steps return their metrics as device scalars; `merge_step_metrics` folds
them into a clu `Collection` that averages over a logging interval without reading them
back (steps flagged non-finite do not count); the host computes the averages only at
log time.
"""

import functools

import jax
import numpy as np
from clu import metrics

from metapix_jax import nonfinite, steps
from metapix_jax.data import labels
from metapix_jax.data import normalization as normalization_lib
from metapix_jax.state import TrainState


@functools.lru_cache
def metrics_collection(names: tuple[str, ...]) -> type[metrics.Collection]:
    """A clu Collection that averages each named scalar over a logging interval.

    Cached: the class is built once per set of names, not at every step.
    """
    return metrics.Collection.create(**{name: metrics.Average.from_output(name) for name in names})


def merge_step_metrics(collection, step_metrics: dict):
    """Adds a step's metrics to the interval's averages; skipped steps do not count."""
    values = {k: v for k, v in step_metrics.items() if k != nonfinite.FLAG}
    cls = metrics_collection(tuple(sorted(values)))
    kept = (step_metrics[nonfinite.FLAG] == 0).reshape(1)
    merged = cls.single_from_model_output(**{k: v.reshape(1) for k, v in values.items()}, mask=kept)
    return merged if collection is None else collection.merge(merged)


def to_uint8_image(image: np.ndarray, normalization: str) -> np.ndarray:
    """Undoes the input normalisation of one image for display."""
    pixels = normalization_lib.to_pixels(image, normalization)
    rgb = pixels[..., ::-1] if normalization == "caffe" else pixels  # Caffe's order is BGR.
    return np.clip(rgb, 0, 255).astype(np.uint8)


def image_summaries(
    state: TrainState,
    inference: steps.Inference,
    batch: dict[str, jax.Array],
    normalization: str,
    show_weights: bool,
) -> dict[str, np.ndarray]:
    """First image of the batch: source, its label and weights; target and prediction."""
    first = lambda x: np.asarray(jax.device_get(x))[:1]  # noqa: E731
    prediction = np.argmax(first(inference.predict(state, batch["target_image"])), -1)
    images = {
        "target/image": to_uint8_image(first(batch["target_image"]), normalization),
        "target/label": labels.colorize(first(batch["target_label"])),
        "target/prediction": labels.colorize(prediction),
    }
    if "source_image" in batch:
        images["source/image"] = to_uint8_image(first(batch["source_image"]), normalization)
        images["source/label"] = labels.colorize(first(batch["source_label"]))
        if show_weights:
            w = first(inference.weights(state, batch))
            images["source/weights"] = (np.clip(w, 0, 1) * 255).astype(np.uint8)[..., None]
    return images
