"""The data boundary: from a config to the examples and streams every mode reads.

`get_datasets(config, workdir)` is the one place that knows where a run's data lives
(real dataset roots or the embedded benchmark; PNG folders, prepared array_record files
or TFDS) and how each split is read. Training, evaluation, compare, predict and prepare
all start from it. Every split is an `Examples` (pipeline.py): random access by index,
whatever the storage.
"""

import dataclasses
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from metapix_jax import console
from metapix_jax.data import labels, pipeline, prepare, sources, synthetic
from metapix_jax.data.pipeline import Examples

Batch = dict[str, np.ndarray]


def benchmark_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the embedded benchmark lives: data.synthetic_root, or WORKDIR/benchmark."""
    return config.data.synthetic_root or os.path.join(workdir, "benchmark")


def write_synthetic(
    config: ml_collections.ConfigDict, workdir: str, workers: int | None = None
) -> str:
    """Writes the embedded benchmark (once per parameter set); returns its root.

    `workers`: rendering processes (default: up to 4 for 500 images or more, else 1)."""
    d = config.data
    root = benchmark_root(config, workdir)
    if jax.process_index() == 0:
        total = d.synthetic_num_source + d.synthetic_num_target_train + d.synthetic_num_target_val
        synthetic.write_benchmark(
            root,
            seed=d.synthetic_seed,
            height=d.height,
            width=d.width,
            num_source=d.synthetic_num_source,
            num_target_train=d.synthetic_num_target_train,
            num_target_val=d.synthetic_num_target_val,
            gap=d.synthetic_gap,
            **synthetic.harm_kwargs(d),
            workers=workers or (min(4, os.cpu_count() or 1) if total >= 500 else 1),
            progress=console.Bar("data", f"writing the benchmark into {root}", total),
        )
    if jax.process_count() > 1:  # The other processes read what process 0 wrote.
        multihost_utils.sync_global_devices("synthetic benchmark written")
    return root


def data_roots(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(source root, target root): the configured ones, or the embedded benchmark's."""
    if config.data.synthetic:
        root = write_synthetic(config, workdir)
        return os.path.join(root, "gta5"), os.path.join(root, "cityscapes")
    return config.data.source_root, config.data.target_root


def source_examples(config: ml_collections.ConfigDict, source_root: str) -> Examples:
    """The source: prepared array_record if configured, else the layout's PNG pairs."""
    d = config.data
    if d.source_prepared:
        return prepare.PreparedExamples(d.source_prepared, (d.height, d.width))
    pairs = sources.source_pairs(d.source_kind, source_root)
    pairs = sources.restrict_to_list(pairs, source_root, d.source_list)
    return sources.PngExamples(tuple(pairs), sources.id_to_train_id(d.source_kind))


def target_examples(
    config: ml_collections.ConfigDict, target_root: str, split: str, list_file: str
) -> Examples:
    """One target split: Cityscapes folder pairs (restricted to the list file) or TFDS."""
    d = config.data
    if d.target_format == "tfds":
        from metapix_jax.data import tfds_source  # Imports tensorflow_datasets: only when chosen.

        return tfds_source.TfdsExamples(split, d.tfds_data_dir)
    pairs = sources.cityscapes_pairs(target_root, split)
    pairs = sources.restrict_to_list(pairs, target_root, list_file)
    return sources.PngExamples(tuple(pairs), labels.CITYSCAPES_ID_TO_TRAIN_ID)


def harmful_mask_path(image_path: str) -> str:
    """The benchmark keeps the mask of harmful pixels of images/X.png in harmful/X.png."""
    folder, name = os.path.split(image_path)
    return os.path.join(os.path.dirname(folder), "harmful", name)


@dataclasses.dataclass(frozen=True)
class WithoutHarm:
    """Source examples with the benchmark's known harmful pixels ignored in their labels.

    The oracle of pixel weighting (method 'oracle_mask'): the harmful pixels' weight is 0
    and every other labeled pixel counts as in direct joint training.
    """

    examples: Examples

    def __len__(self) -> int:
        return len(self.examples)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.examples.read(index)
        harmful = sources.read_mask(harmful_mask_path(self.examples.name(index)))
        if harmful.shape != label.shape:
            raise sources.DataError(
                f"harmful mask of {self.examples.name(index)!r} is {harmful.shape[::-1]}, its "
                f"label {label.shape[::-1]} (width x height)"
            )
        return image, np.where(harmful, labels.IGNORE_LABEL, label).astype(label.dtype)

    def name(self, index: int) -> str:
        return self.examples.name(index)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """A run's splits, and the streams of batches drawn from them."""

    config: ml_collections.ConfigDict
    source: Examples | None  # None for methods that never read a source image.
    target_train: Examples | None  # None where nothing trains (evaluation).
    target_eval: Examples

    def train_batches(self, position: int) -> Iterator[Batch]:
        """This process's rows of the joined source/target batches of positions
        `position`, `position + 1`, ... (a pure function of the seed and the position)."""
        target = self.stream(self.target_train, "target", position)
        source = self.stream(self.source, "source", position) if self.source else None
        while True:
            t = next(target)
            batch = {"target_image": t["image"], "target_label": t["label"]}
            if source is not None:
                s = next(source)
                batch.update(source_image=s["image"], source_label=s["label"])
            yield batch

    def stream(self, examples: Examples, domain: str, position: int) -> Iterator[Batch]:
        """This process's rows of one domain's endless stream, from batch `position` on."""
        d = self.config.data
        return pipeline.train_batches(
            examples,
            batch_size=d.source_batch if domain == "source" else d.target_batch,
            size=(d.height, d.width),
            seed=self.config.seed + (0 if domain == "source" else 1),
            flip=d.target_flip and domain == "target",
            normalization=d.normalization,
            start_step=position,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            num_threads=d.num_threads,
            num_workers=d.num_workers,
            skip_bad=d.skip_bad_files,
        )

    def eval_batches(self, examples: Examples | None = None) -> Iterator[Batch]:
        """One ordered pass over the target eval split (or `examples`), this process's
        rows of each batch, unflipped; the last batch padded with ignored pixels."""
        d = self.config.data
        batches = pipeline.eval_batches(
            self.target_eval if examples is None else examples,
            batch_size=d.eval_batch,
            size=(d.height, d.width),
            normalization=d.normalization,
            num_threads=d.num_threads,
            protocol=d.eval_protocol,
            skip_bad=d.skip_bad_files,
        )
        share = d.eval_batch // jax.process_count()
        start = jax.process_index() * share
        for batch in batches:
            yield {k: v[start : start + share] for k, v in batch.items()}


def get_datasets(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    with_source: bool,
    with_train: bool = True,
    without_harm: bool = False,
) -> Datasets:
    """The splits of a run: the source (when asked: methods that never read one, and
    evaluation, skip listing it; `without_harm`: its known harmful pixels ignored), the target
    train split (unless not `with_train`: evaluation reads none) and the target eval split.
    Writes the embedded benchmark first if the config asks for it."""
    source_root, target_root = data_roots(config, workdir)
    d = config.data
    source = source_examples(config, source_root) if with_source else None
    split, listed = d.target_train_split, d.target_train_list
    train = target_examples(config, target_root, split, listed) if with_train else None
    return Datasets(
        config=config,
        source=WithoutHarm(source) if source is not None and without_harm else source,
        target_train=train,
        target_eval=target_examples(config, target_root, d.target_eval_split, d.target_eval_list),
    )


@dataclasses.dataclass(frozen=True)
class Head:
    """The first `count` examples of another `Examples` (e.g. source images to inspect)."""

    examples: Examples
    count: int

    def __len__(self) -> int:
        return min(self.count, len(self.examples))

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.examples.read(index)

    def name(self, index: int) -> str:
        return self.examples.name(index)
