"""Prepare a source dataset once: resized uint8 images and train-id labels in array_record.

    python -m metapix_jax.data.prepare --config=configs/gta5.py --out=/data/gta5_1024x512

reads the configured source (data.source_kind, data.source_root, data.source_list), resizes
every example to data.height x data.width with the pipeline's own `resize`, and writes
OUT/examples.array_record (one record per example, in the source list's order) and
OUT/meta.json. Training with data.source_prepared=OUT then reads the records instead of
decoding and resizing PNGs: same examples, same order, so the streams are identical.

A record is a 12-byte header (magic, height, width as little-endian uint32) followed by the
raw image bytes (HxWx3) and label bytes (HxW). Raw bytes cost disk (1.5 MB per 1024x512
example) but no decoding.
"""

import json
import os
import struct

import grain
import numpy as np

from metapix_jax.data import pipeline, sources, transforms

RECORDS = "examples.array_record"
META = "meta.json"
_MAGIC = 0x4D505852  # 'MPXR'
_HEADER = struct.Struct("<III")


def encode(image: np.ndarray, label: np.ndarray) -> bytes:
    """One record: header, then the uint8 image and label bytes."""
    height, width = label.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image {image.shape} does not match label {label.shape}")
    header = _HEADER.pack(_MAGIC, height, width)
    return (
        header + np.ascontiguousarray(image, np.uint8).tobytes() + label.astype(np.uint8).tobytes()
    )


def decode(record: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3, label HxW) uint8 from a record written by `encode`."""
    magic, height, width = _HEADER.unpack_from(record)
    expected = _HEADER.size + 4 * height * width
    if magic != _MAGIC or len(record) != expected:
        raise sources.DataError(f"not a prepared record (magic {magic:#x}, {len(record)} bytes)")
    pixels = np.frombuffer(record, np.uint8, offset=_HEADER.size)
    image = pixels[: 3 * height * width].reshape(height, width, 3)
    return image, pixels[3 * height * width :].reshape(height, width)


class PreparedExamples:
    """Random access to a prepared directory (the `Examples` interface of the pipelines)."""

    def __init__(self, directory: str, size: tuple[int, int] | None = None):
        meta_path = os.path.join(directory, META)
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise sources.DataError(
                f"{meta_path!r} is missing or unreadable (data.source_prepared must be a "
                f"directory written by `python -m metapix_jax.data.prepare`): {e}"
            ) from e
        stored = (self.meta["height"], self.meta["width"])
        if size is not None and tuple(size) != stored:
            raise sources.DataError(
                f"{meta_path!r} holds {stored[1]}x{stored[0]} examples but the config asks for "
                f"data.width x data.height = {size[1]}x{size[0]}: prepare again at that size"
            )
        self.path = os.path.join(directory, RECORDS)
        self._source = None  # Opened on first read, so the object pickles into workers.

    def __len__(self) -> int:
        return len(self.meta["names"])

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image and train ids, already at the prepared size."""
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.path)
        return decode(self._source[index])

    def name(self, index: int) -> str:
        """The original image file of example `index`."""
        return self.meta["names"][index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}


def write_prepared(
    examples: pipeline.Examples,
    out: str,
    size: tuple[int, int],
    *,
    skip_bad: bool = False,
    num_threads: int = 4,
) -> int:
    """Writes every example of `examples`, resized to `size`, to OUT; returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    def load(index: int) -> bytes:
        image, label = pipeline.read_or_replace(examples, index, skip_bad)
        # Each to `size` on its own: an image and label of different sizes both get there.
        return encode(*transforms.resize(image, label, size))

    os.makedirs(out, exist_ok=True)
    records = grain.MapDataset.range(len(examples)).map(load)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    writer = ArrayRecordWriter(os.path.join(out, RECORDS), "group_size:1")
    try:
        for record in records.to_iter_dataset(options):
            writer.write(record)
    finally:
        writer.close()
    meta = {
        "height": size[0],
        "width": size[1],
        "names": [examples.name(i) for i in range(len(examples))],
    }
    with open(os.path.join(out, META), "w") as f:
        json.dump(meta, f, indent=1)
    return len(examples)


def main(argv: list[str]) -> None:
    """absl entry point: --config (an ml_collections config file) and --out."""
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    from metapix_jax.data import datasets  # It reads prepared data too: imported late.

    config, out = flags.FLAGS.config, flags.FLAGS.out
    d = config.data
    count = write_prepared(
        datasets.source_examples(config, d.source_root),
        out,
        (d.height, d.width),
        skip_bad=d.skip_bad_files,
        num_threads=d.num_threads,
    )
    print(f"wrote {count} examples at {d.width}x{d.height} to {out}")


def define_flags() -> None:
    """--config (locked, so a mistyped --config.x is an error) and --out."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("out", None, "Output directory.")
    flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
