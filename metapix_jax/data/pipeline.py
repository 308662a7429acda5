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

Every dataset is read through `Examples` (`len`, `read(i)`, `name(i)`): PNG folders
(`sources.PngExamples`), prepared array_record files (`prepare.PreparedExamples`) and TFDS
(`tfds_source.TfdsExamples`) give identical streams for identical examples. Decoding runs in
grain's threads, or in `num_workers` processes (grain's `mp_prefetch`, which splits the
batches over the workers and interleaves them back in order, so the stream is unchanged).

Bad files: with `skip_bad=True` an unreadable example i is replaced by the next readable one
(i+1, i+2, ... in the list), which keeps the stream a pure function of (seed, position); each
replacement is logged with a warning naming the file, and counted (`bad_file_count`).
An image and label of different sizes are not bad: each is resized to the training size on
its own (`preprocess`), as the authors' loader does, with one warning per file.
"""

import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import grain
import numpy as np
from absl import logging

from metapix_jax.data import labels, sources, transforms
from metapix_jax.data import normalization as normalize

EVAL_PROTOCOLS = ("full", "resized")


class Examples(Protocol):
    """Random access to a dataset's (uint8 image HxWx3, uint8 train ids HxW) examples."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def name(self, index: int) -> str: ...


def as_examples(data, id_to_train_id: np.ndarray | None) -> Examples:
    """`data` itself if it is an `Examples`, else a list of PNG pairs read with the id table."""
    if hasattr(data, "read") and hasattr(data, "name"):
        return data
    if id_to_train_id is None:
        raise ValueError("a list of (image, label) pairs needs its id -> train id table")
    return sources.PngExamples(tuple(map(tuple, data)), np.asarray(id_to_train_id))


_bad_lock = threading.Lock()
_bad_files: dict[str, int] = {}


def bad_file_count() -> int:
    """How many bad examples this process replaced so far.

    Counts reads, including read-ahead that was never consumed; worker processes count their own.
    """
    with _bad_lock:
        return sum(_bad_files.values())


def _count_bad(name: str, error: Exception, replacement: str) -> None:
    with _bad_lock:
        _bad_files[name] = _bad_files.get(name, 0) + 1
        total = sum(_bad_files.values())
    logging.warning(
        "skipping bad file %s (%s); using %s instead (%d replacements so far)",
        name,
        error,
        replacement,
        total,
    )


def read_or_replace(
    examples: Examples, index: int, skip_bad: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Example `index`; with `skip_bad`, the next readable one when it cannot be read."""
    try:
        return examples.read(index)
    except sources.DataError as error:
        if not skip_bad:
            raise
        first_error = error
    n = len(examples)
    for offset in range(1, n):
        other = (index + offset) % n
        try:
            example = examples.read(other)
        except sources.DataError:
            continue
        _count_bad(examples.name(index), first_error, examples.name(other))
        return example
    raise sources.DataError(f"no readable example at all (first bad one: {first_error})")


def _shuffle_seed(seed: int) -> int:
    """Hash the seed: grain seeds epoch e by seed+e, so seed s epoch 1 would be seed s+1 epoch 0."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _flip_of(seed: int, position: int) -> bool:
    """Deterministic fair coin for stream position `position`."""
    return bool(np.random.default_rng([seed, 1, position]).random() < 0.5)


def _train_example(
    position: int,
    index: int,
    *,
    examples: Examples,
    skip_bad: bool,
    seed: int,
    flip: bool,
    size: tuple[int, int] | None,
    normalization: str,
) -> dict[str, np.ndarray]:
    """Stream position `position` holds example `index`: read, resize, maybe flip, normalise.

    A module-level function (bound with functools.partial) so worker processes can pickle it.
    """
    image, label = read_or_replace(examples, index, skip_bad)
    x, y = transforms.preprocess(
        image, label, size, flip and _flip_of(seed, position), normalization
    )
    return {"image": x, "label": y}


def _to_batches(ds: grain.MapDataset, rows: int, num_threads: int, num_workers: int):
    """Batches of `rows` in stream order, read ahead by threads (or worker processes).

    Batching comes before `to_iter_dataset` so each thread or worker builds whole batches:
    grain's workers take every num_workers-th element, and must take whole batches for the
    stream to be the same with and without them.
    """
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
    batched = ds.batch(rows).to_iter_dataset(options)
    if num_workers > 0:
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batched


def _check_normalization(normalization: str) -> None:
    if normalization not in normalize.NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {normalize.NORMALIZATIONS}, got {normalization!r}"
        )


def train_batches(
    pairs: Sequence[tuple[str, str]] | Examples,
    id_to_train_id: np.ndarray | None = None,
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
    num_workers: int = 0,
    skip_bad: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled stream of batches {'image': f32 [b,H,W,3], 'label': i32 [b,H,W]}.

    `pairs` is a list of PNG (image, label) pairs read with `id_to_train_id`, or an `Examples`.
    `batch_size` is the global batch B; this process yields b = B / shard_count rows of each
    global batch (see the module docstring for the scheme). The first batch yielded is global
    batch `start_step`: batch k of a stream started at 0 equals batch k - start_step of a stream
    started at `start_step`, and skipping costs nothing (random access). Decoding runs in
    `num_threads` threads (in each of `num_workers` processes if > 0).
    """
    examples = as_examples(pairs, id_to_train_id)
    if not len(examples):
        raise ValueError("train_batches needs at least one (image, label) pair")
    if not 0 <= shard_index < shard_count or batch_size % shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count dividing batch_size; got {shard_index=}, "
            f"{shard_count=}, {batch_size=}"
        )
    _check_normalization(normalization)
    load = functools.partial(
        _train_example,
        examples=examples,
        skip_bad=skip_bad,
        seed=seed,
        flip=flip,
        size=size,
        normalization=normalization,
    )
    # Endless in practice; a finite epoch count keeps every length (after batching) an index.
    epochs = max(1, 2**48 // len(examples))
    ds = grain.MapDataset.range(len(examples)).shuffle(seed=_shuffle_seed(seed)).repeat(epochs)
    ds = ds.map_with_index(load)  # index = global stream position (after shuffle and repeat).
    ds = ds[start_step * batch_size + shard_index :: shard_count]
    return iter(_to_batches(ds, batch_size // shard_count, num_threads, num_workers))


def _describe(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def label_size_error(
    examples: Examples, index: int, size: tuple[int, int], reference: tuple[int, int]
) -> sources.DataError:
    """The error for an eval label whose size differs from the first one's.

    The first label is only the reference because it is read first; when it is the odd one,
    blaming example `index` would name a correct file. So, where the examples can tell their
    label sizes cheaply (`label_size`, from PNG headers), the message names the files that
    differ from the majority size, with theirs; otherwise (or on a tie) it names both files.
    """
    fix = (
        "data.eval_protocol='full' needs one native label size for the whole eval split "
        "(use 'resized' to evaluate at data.height x data.width)"
    )
    label_size = getattr(examples, "label_size", None)
    name = getattr(examples, "label_name", examples.name)
    if label_size is not None:
        sizes: dict[tuple[int, int], list[int]] = {}
        for i in range(len(examples)):
            found = label_size(i)
            if found is not None:
                sizes.setdefault(tuple(found), []).append(i)
        ranked = sorted(sizes.items(), key=lambda item: -len(item[1]))
        if len(ranked) > 1 and len(ranked[0][1]) > len(ranked[1][1]):
            majority, members = ranked[0]
            odd = [(i, s) for s, ids in ranked[1:] for i in ids]
            listed = ", ".join(f"{name(i)!r} ({_describe(s)})" for i, s in odd[:5])
            more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
            return sources.DataError(
                f"eval labels differ in size: {len(members)} of {len(examples)} are "
                f"{_describe(majority)} (width x height), but not {listed}{more}: "
                f"{fix}"
            )
    return sources.DataError(
        f"eval labels differ in size: {name(index)!r} is {_describe(size)}, "
        f"{name(0)!r} is {_describe(reference)} "
        f"(width x height): {fix}"
    )


def _eval_example(
    index: int,
    *,
    examples: Examples,
    skip_bad: bool,
    size: tuple[int, int] | None,
    normalization: str,
    label_shape: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """Eval example: image resized to `size`; label resized too, or kept at `label_shape`."""
    image, label = read_or_replace(examples, index, skip_bad)
    if label_shape is not None and label.shape != label_shape:
        raise label_size_error(examples, index, label.shape, label_shape)
    x, y = transforms.preprocess(
        image, label, size, False, normalization, resize_label=label_shape is None
    )
    return {"image": x, "label": y}


def eval_batches(
    pairs: Sequence[tuple[str, str]] | Examples,
    id_to_train_id: np.ndarray | None = None,
    *,
    batch_size: int,
    size: tuple[int, int] | None,
    normalization: str,
    num_threads: int = 8,
    protocol: str = "resized",
    skip_bad: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass in batches of `batch_size`, no flip.

    protocol 'resized' (the authors'): images and labels (nearest) at `size`. 'full' (the
    official Cityscapes protocol): images at `size`, labels at their native size, which must be
    the same for every example (all Cityscapes val labels are 2048x1024; otherwise a DataError
    names the labels that differ from the others, see `label_size_error`); the eval step
    upsamples the logits to it. The last batch is padded to `batch_size` with zero images and
    label 255 everywhere, so every batch has one static shape and padding never counts.
    """
    examples = as_examples(pairs, id_to_train_id)
    if not len(examples):
        raise ValueError("eval_batches needs at least one (image, label) pair")
    _check_normalization(normalization)
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"data.eval_protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")
    label_shape = None
    if protocol == "full":
        label_shape = tuple(read_or_replace(examples, 0, skip_bad)[1].shape)
    load = functools.partial(
        _eval_example,
        examples=examples,
        skip_bad=skip_bad,
        size=size,
        normalization=normalization,
        label_shape=label_shape,
    )
    ds = grain.MapDataset.range(len(examples)).map(load)
    return _padded(iter(_to_batches(ds, batch_size, num_threads, 0)), batch_size)


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
