"""Input pipelines on grain `MapDataset`s.

A training stream is a pure function of (seed, position): position p of the endless stream is
element p of `source.shuffle(seed').repeat()`, whose epoch e is a fresh permutation seeded by
(seed' + e) (grain's `ShuffleMapDataset` folds the epoch into the seed), and the flip of
position p is drawn from (seed, p). Global batch k holds positions [k*B, (k+1)*B). Nothing
depends on what was read before, so resuming at step k is a slice, not a replay.

Multi-host sharding: process s of S reads positions p = k*B + j*S + s (j < B/S), i.e. the
slice `[start_step*B + s :: S]` batched by B/S. Over all processes, local batch k covers exactly
global batch k, whatever S is; local row j of process s is position k*B + j*S + s, so a
global array assembled process-major (as `jax.make_array_from_process_local_data` does)
holds the same examples as a single-process batch, in a different row order.
"""

from collections.abc import Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from metapix_jax.data import labels, sources

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)
NORMALIZATIONS = ("imagenet", "caffe")


def preprocess(
    image: np.ndarray,
    label: np.ndarray,
    size: tuple[int, int] | None,
    flip: bool,
    normalization: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to `size` (height, width), optionally flip, normalise.

    Image bicubic, label nearest (so no invented classes), both with PIL as the authors' setup
    does. 'imagenet' matches torchvision VGG weights (RGB/255, mean/std); 'caffe' is what the
    authors' code feeds (BGR, 0-255, minus the Caffe mean). `size=None` keeps the native size.
    Returns float32 HxWx3 and int32 HxW.
    """
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        wh = (size[1], size[0])
        image = np.asarray(Image.fromarray(image).resize(wh, Image.Resampling.BICUBIC))
        label = np.asarray(Image.fromarray(label).resize(wh, Image.Resampling.NEAREST))
    if flip:
        image, label = image[:, ::-1], label[:, ::-1]
    x = image.astype(np.float32)
    if normalization == "imagenet":
        x = (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif normalization == "caffe":
        x = x[..., ::-1] - CAFFE_MEAN_BGR
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(label, dtype=np.int32)


def _shuffle_seed(seed: int) -> int:
    """Hash the seed: grain seeds epoch e by seed+e, so seed s epoch 1 would be seed s+1 epoch 0."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _flip_of(seed: int, position: int) -> bool:
    """Deterministic fair coin for stream position `position`."""
    return bool(np.random.default_rng([seed, 1, position]).random() < 0.5)


def train_batches(
    pairs: Sequence[tuple[str, str]],
    id_to_train_id: np.ndarray,
    *,
    batch_size: int,
    size: tuple[int, int] | None,
    seed: int,
    flip: bool,
    normalization: str,
    start_step: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled stream of batches {'image': f32 [b,H,W,3], 'label': i32 [b,H,W]}.

    `batch_size` is the global batch B; this process yields b = B / shard_count rows of each
    global batch (see the module docstring for the scheme). The first batch yielded is global
    batch `start_step`: batch k of a stream started at 0 equals batch k - start_step of a stream
    started at `start_step`, and skipping costs nothing (random access). Decoding runs in
    `num_threads` threads.
    """
    if not pairs:
        raise ValueError("train_batches needs at least one (image, label) pair")
    if not 0 <= shard_index < shard_count or batch_size % shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count dividing batch_size; got {shard_index=}, "
            f"{shard_count=}, {batch_size=}"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    lut = np.asarray(id_to_train_id)

    def load(position: int, pair: tuple[str, str]) -> dict[str, np.ndarray]:
        image, label = sources.read_example(pair[0], pair[1], lut)
        do_flip = flip and _flip_of(seed, position)
        x, y = preprocess(image, label, size, do_flip, normalization)
        return {"image": x, "label": y}

    ds = grain.MapDataset.source(list(pairs)).shuffle(seed=_shuffle_seed(seed)).repeat()
    ds = ds.map_with_index(load)  # index = global stream position (after shuffle and repeat).
    ds = ds[start_step * batch_size + shard_index :: shard_count]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)
    return iter(ds.to_iter_dataset(options).batch(batch_size // shard_count))


def eval_batches(
    pairs: Sequence[tuple[str, str]],
    id_to_train_id: np.ndarray,
    *,
    batch_size: int,
    size: tuple[int, int] | None,
    normalization: str,
    num_threads: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass in batches of `batch_size`, no flip.

    The last batch is padded to `batch_size` with zero images and label 255 everywhere, so every
    batch has one static shape (one compilation) and padding never counts in the metrics.
    """
    if not pairs:
        raise ValueError("eval_batches needs at least one (image, label) pair")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    lut = np.asarray(id_to_train_id)

    def load(pair: tuple[str, str]) -> dict[str, np.ndarray]:
        x, y = preprocess(*sources.read_example(pair[0], pair[1], lut), size, False, normalization)
        return {"image": x, "label": y}

    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)
    ds = grain.MapDataset.source(list(pairs)).map(load).to_iter_dataset(options).batch(batch_size)
    return _padded(iter(ds), batch_size)


def _padded(
    batches: Iterator[dict[str, np.ndarray]], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Pad a short (last) batch to `batch_size` rows: zero images, label 255."""
    for batch in batches:
        missing = batch_size - len(batch["label"])
        if missing:
            batch = {
                "image": np.pad(batch["image"], [(0, missing), (0, 0), (0, 0), (0, 0)]),
                "label": np.pad(
                    batch["label"],
                    [(0, missing), (0, 0), (0, 0)],
                    constant_values=labels.IGNORE_LABEL,
                ),
            }
        yield batch
