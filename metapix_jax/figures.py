"""Pictures of what a run learns: the same few examples at every image summary.

TensorBoard shows, every `image_every` steps, a few fixed source images, each as one
strip `image | label | weight map | harmful mask` (the mask where the embedded benchmark
knows it), and a fixed target val image as `image | label | prediction`, enlarged so that
the demo's 64x128 images are readable. Fixed examples make TensorBoard's step slider show
how one weight map evolves. Compare mode saves the same strips of the final MetaPix
weights as WORKDIR/weights.png.

Multi-host: every process runs the (collective) forward passes on its share of the
examples; process 0 draws its own rows, which are the first ones.
"""

import dataclasses
import os

import jax
import numpy as np
from PIL import Image

from metapix_jax import parallel, steps
from metapix_jax.data import datasets, labels, sources
from metapix_jax.data import normalization as normalization_lib
from metapix_jax.state import TrainState

GAP = 4  # White pixels between panels.
TARGET_HEIGHT = 192  # Panels are enlarged by an integer factor to about this height.


@dataclasses.dataclass(frozen=True)
class Examples:
    """This process's rows of the fixed examples, and the harmful masks of the source ones."""

    source: dict[str, np.ndarray] | None  # {'source_image', 'source_label'}
    count: int  # How many source rows are drawn.
    harmful: list[np.ndarray] | None  # Per drawn source row, where the benchmark has masks.
    target: dict[str, np.ndarray]  # {'image', 'label'}


def fixed_examples(data: datasets.Datasets, count: int = 2) -> Examples:
    """The first eval batch of the source (its first `count` rows are drawn) and of the
    target val split; read once per run."""
    target = next(data.eval_batches())
    if data.source is None:
        return Examples(None, 0, None, target)
    head = datasets.Head(data.source, data.config.data.eval_batch)
    batch = next(data.eval_batches(head))
    source = {"source_image": batch["image"], "source_label": batch["label"]}
    rows = len(batch["label"])  # This process's rows of the batch, from `first` on.
    first, count = jax.process_index() * rows, min(count, rows, len(head))
    masks = [datasets.harmful_mask_path(head.name(first + i)) for i in range(count)]
    harmful = [sources.read_mask(m) for m in masks] if all(map(os.path.isfile, masks)) else None
    return Examples(source, count, harmful, target)


def local_rows(x: jax.Array, count: int) -> np.ndarray:
    """The first `count` rows this process holds of a batch-split global array."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])[:count]


def fit(panel: np.ndarray) -> np.ndarray:
    """An HxW(x3) panel as uint8 RGB about TARGET_HEIGHT high: small ones enlarged (each
    pixel repeated, so labels stay crisp), large ones thinned by a whole stride."""
    rgb = panel if panel.ndim == 3 else np.repeat(panel[..., None], 3, axis=-1)
    height = rgb.shape[0]
    if height > TARGET_HEIGHT:
        stride = height // TARGET_HEIGHT
        return rgb[::stride, ::stride].astype(np.uint8)
    factor = max(1, TARGET_HEIGHT // height)
    return np.repeat(np.repeat(rgb.astype(np.uint8), factor, 0), factor, 1)


def strip(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side with white gaps, each brought to about TARGET_HEIGHT."""
    big = [fit(p) for p in panels]
    gap = np.full((big[0].shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([x for p in big for x in (p, gap)][:-1], axis=1)


def stack(strips: list[np.ndarray]) -> np.ndarray:
    """Strips one above the other with white gaps."""
    gap = np.full((GAP, strips[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for s in strips for x in (s, gap)][:-1], axis=0)


def to_pixels(image: np.ndarray, normalization: str) -> np.ndarray:
    """Undoes the input normalisation of one image for display (uint8 RGB)."""
    pixels = normalization_lib.to_pixels(image, normalization)
    rgb = pixels[..., ::-1] if normalization == "caffe" else pixels  # Caffe's order is BGR.
    return np.clip(rgb, 0, 255).astype(np.uint8)


def grey(weights: np.ndarray, label: np.ndarray) -> np.ndarray:
    """A weight map as grey pixels (white = 1); unlabeled pixels black (their loss is 0)."""
    w = np.where(label == labels.IGNORE_LABEL, 0.0, np.clip(weights, 0, 1))
    return np.rint(255 * w).astype(np.uint8)


def source_strips(
    state: TrainState, inference: steps.Inference, shown: Examples, mesh, normalization: str
) -> list[np.ndarray]:
    """`image | label | weights | harmful mask` for each fixed source example."""
    batch = parallel.to_global(shown.source, mesh)
    weights = local_rows(inference.weights(state, batch), shown.count)
    strips = []
    for i in range(shown.count):
        label = shown.source["source_label"][i]
        panels = [
            to_pixels(shown.source["source_image"][i], normalization),
            labels.colorize(label),
            grey(weights[i], label),
        ]
        if shown.harmful:
            panels.append((255 * shown.harmful[i]).astype(np.uint8))
        strips.append(strip(panels))
    return strips


def image_summaries(
    state: TrainState,
    inference: steps.Inference,
    shown: Examples,
    mesh,
    normalization: str,
    show_weights: bool,
) -> dict[str, np.ndarray]:
    """The TensorBoard images: target strip, and the source strips where weights mean
    something (a phase that uses or learns the U-Net). Every process must call it."""
    target = parallel.to_global(shown.target, mesh)
    prediction = local_rows(inference.predict(state, target["image"]), 1).argmax(-1)[0]
    label = shown.target["label"][0]
    if label.shape != prediction.shape:  # 'full' protocol: the label at its native size.
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(prediction.shape[::-1]))
    images = {
        "target/image_label_prediction": strip(
            [
                to_pixels(shown.target["image"][0], normalization),
                labels.colorize(label),
                labels.colorize(prediction),
            ]
        )[None]
    }
    if shown.source is not None and show_weights:
        strips = source_strips(state, inference, shown, mesh, normalization)
        images["source/image_label_weights_harmful"] = stack(strips)[None]
    return images


def write_weights_figure(
    state: TrainState, inference: steps.Inference, data: datasets.Datasets, mesh, path: str
) -> None:
    """`path`: the final weight maps of a few source images beside their labels and masks."""
    shown = fixed_examples(data, count=min(4, data.config.data.eval_batch))
    strips = source_strips(state, inference, shown, mesh, data.config.data.normalization)
    if jax.process_index() == 0:
        Image.fromarray(stack(strips)).save(path)
