"""Predict mode: segment image files with a trained checkpoint; export the U-Net's weights.

Each image is resized to the network's height x width, segmented by the target branch
(the test-time model), and its logits are upsampled (bilinear, align corners, as the
decoder) back to the image's own size before the argmax. Outputs, per input image:
`<name>_color.png` (Cityscapes palette; `predict.color=False` leaves it out), optionally
`<name>_overlay.png` (the colours blended over the image), `<name>_trainIds.png` (raw train
ids) and `<name>_labelIds.png` (Cityscapes label ids: with only these in a folder,
`python -m metapix_jax.data.cityscapes_eval` and the benchmark server take it as it is).
Outputs mirror the inputs' folders below their common folder.

`predict.weights_for='source'` also writes the weight maps of the first source images
(paper Fig. 3): grey PNGs, white = weight 1. W19 shows the weight of each pixel's
labeled class; unlabeled pixels are black.

Several processes share the work as in evaluation: the images go in global batches of
`data.eval_batch`, each process reads and writes its share of each batch (rows
[p * share, (p + 1) * share)), and every process makes the same calls with the same shapes
(the last batch, and a process's share of it, padded).
"""

import functools
import glob
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from metapix_jax import evaluate, figures, parallel, steps
from metapix_jax.data import datasets, labels, sources, transforms
from metapix_jax.models.resize import resize_bilinear_align_corners
from metapix_jax.state import TrainState

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
WEIGHTS_FOR = ("", "source")  # config.predict.weights_for


def find_images(pattern: str) -> list[str]:
    """Image files in a folder (recursively) or matching a glob, sorted."""
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    found = sorted(
        p
        for p in glob.glob(pattern, recursive=True)
        if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not found:
        raise sources.DataError(
            f"predict.input={pattern!r} matched no images (extensions {IMAGE_EXTENSIONS})"
        )
    return found


def output_stems(paths: list[str], output: str) -> list[str]:
    """OUTPUT/<path relative to the inputs' common folder, without extension>."""
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [
        os.path.join(output, os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0])
        for p in paths
    ]


def network_input(image: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
    """Resized to data.height x data.width and normalised as in training."""
    d = config.data
    dummy = np.zeros(image.shape[:2], np.uint8)
    x, _ = transforms.preprocess(image, dummy, (d.height, d.width), False, d.normalization)
    return x


def process_batches(count: int, batch_size: int) -> Iterator[list[int]]:
    """For each global batch of `batch_size` of `count` items, the indices this process
    holds (its rows of the batch; fewer, or none, in the padded last batch). Every process
    gets as many batches, so every process makes the same collective calls."""
    share = batch_size // jax.process_count()
    first = jax.process_index() * share
    for start in range(0, count, batch_size):
        yield [i for i in range(start + first, start + first + share) if i < count]


def stack_padded(
    arrays: list[np.ndarray], rows: int, shape: tuple[int, ...], dtype, fill: int = 0
) -> np.ndarray:
    """`arrays` (each of `shape`) in `rows` rows, padded with `fill`: every batch has one
    shape (one compilation), also a process's share with no item left in it."""
    batch = np.full((rows, *shape), fill, dtype)
    if arrays:
        batch[: len(arrays)] = np.stack(arrays)
    return batch


@functools.partial(jax.jit, static_argnums=(1, 2))
def labels_at_size(logits: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """Train ids at (height, width) from one image's network-size logits: upsample, argmax."""
    return jnp.argmax(resize_bilinear_align_corners(logits[None], height, width)[0], axis=-1)


def write_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(array).save(path)


def write_prediction(stem: str, image: np.ndarray, ids: np.ndarray, p) -> None:
    """The PNGs the config asks for: colours, overlay, train ids, Cityscapes label ids."""
    color = labels.colorize(ids)
    if p.color:
        write_png(f"{stem}_color.png", color)
    if p.overlay > 0:
        blend = (1 - p.overlay) * image.astype(np.float32) + p.overlay * color
        write_png(f"{stem}_overlay.png", np.clip(np.rint(blend), 0, 255).astype(np.uint8))
    if p.train_ids:
        write_png(f"{stem}_trainIds.png", ids)
    if p.label_ids:  # What the official evaluator and the benchmark server read.
        write_png(f"{stem}_labelIds.png", labels.TRAIN_ID_TO_CITYSCAPES_ID[ids])


def segment_images(
    config, state: TrainState, inference: steps.Inference, mesh, paths, output: str
) -> None:
    """Writes the PNGs of this process's share of the images in `paths` under `output`."""
    d = config.data
    share = d.eval_batch // jax.process_count()
    stems = output_stems(paths, output)
    for indices in process_batches(len(paths), d.eval_batch):
        images = [sources.read_image(paths[i]) for i in indices]
        inputs = [network_input(im, config) for im in images]
        x = stack_padded(inputs, share, (d.height, d.width, 3), np.float32)
        logits = inference.predict(state, parallel.to_global({"x": x}, mesh)["x"])
        mine = figures.local_rows(logits, len(indices))
        for i, image, row in zip(indices, images, mine, strict=True):
            ids = np.asarray(labels_at_size(row, *image.shape[:2])).astype(np.uint8)
            write_prediction(stems[i], image, ids, config.predict)


def grey_at_size(weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [0, 1] map as 8-bit grey at (height, width), bilinear."""
    resized = Image.fromarray(weights.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip(np.rint(np.asarray(resized) * 255), 0, 255).astype(np.uint8)


def export_weights(
    config, state: TrainState, inference: steps.Inference, mesh, images, output: str
) -> None:
    """<output>/<name>_weights.png for each source example (paper Fig. 3).

    Unlabeled pixels are drawn black: their weight multiplies a zero loss.
    """
    d = config.data
    share, size = d.eval_batch // jax.process_count(), (d.height, d.width)
    stems = output_stems([images.name(i) for i in range(len(images))], output)
    for indices in process_batches(len(images), d.eval_batch):
        examples = [images.read(i) for i in indices]
        inputs = [transforms.preprocess(x, y, size, False, d.normalization) for x, y in examples]
        batch = {
            "source_image": stack_padded([x for x, _ in inputs], share, (*size, 3), np.float32),
            "source_label": stack_padded(
                [y for _, y in inputs], share, size, np.int32, d.ignore_label
            ),
        }
        weights = figures.local_rows(
            inference.weights(state, parallel.to_global(batch, mesh)), len(indices)
        )
        for row, (i, (image, _)) in enumerate(zip(indices, examples, strict=True)):
            label = inputs[row][1]
            w = np.where(label == d.ignore_label, 0.0, weights[row])
            write_png(f"{stems[i]}_weights.png", grey_at_size(w, *image.shape[:2]))


def run_prediction(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Predict mode (see the module docstring)."""
    p = config.predict
    paths = find_images(p.input) if p.input else []
    output = p.output or os.path.join(workdir, "predict")
    mesh = parallel.make_mesh()
    inference = steps.make_inference(config, mesh)
    state = evaluate.restore_for_reading(config, workdir, mesh)
    if paths:
        segment_images(config, state, inference, mesh, paths, output)
        all_written("predict: images segmented")
        say(f"predict: {len(paths)} images segmented into {output}")
    if p.weights_for == "source":
        data = datasets.get_datasets(config, workdir, with_source=True)
        images = datasets.Head(data.source, p.num_weight_images)
        weights_dir = os.path.join(output, "source_weights")
        export_weights(config, state, inference, mesh, images, weights_dir)
        all_written("predict: weight maps written")
        say(f"predict: weight maps of {len(images)} source images in {weights_dir}")


def all_written(name: str) -> None:
    """Several processes: waits until every process has written its PNGs, so that the
    line saying they are written comes after the last one."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def say(line: str) -> None:
    """A line on stdout from process 0 of a multi-process run only."""
    if jax.process_index() == 0:
        print(line, flush=True)
