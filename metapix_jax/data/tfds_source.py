"""Cityscapes through tensorflow-datasets' `cityscapes/semantic_segmentation` builder.

An alternative to the folder layout for the target domain (config data.target_format='tfds').
This module imports tensorflow_datasets (slow to import), so it is imported only when that
format is chosen; the rest of the data package never imports it. Reading needs no TensorFlow:
`tfds.data_source` reads array_record files and decodes the PNGs with OpenCV or Pillow.

The dataset must already be built in the array_record file format (random access is what the
pipelines need). Building runs the builder's TensorFlow code once, so it needs the packages of
requirements-tfds-build.txt; with the official zips (leftImg8bit_trainvaltest.zip,
gtFine_trainvaltest.zip) in ZIPS:

    python -c "import tensorflow_datasets as tfds; tfds.builder(
        'cityscapes/semantic_segmentation', data_dir='DIR', file_format='array_record'
    ).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir='ZIPS'))"

(The Python API rather than `tfds build`: tensorflow-datasets 4.9.10's command line imports
apache-beam at start-up and fails without it.)
"""

import numpy as np

from metapix_jax.data import labels, sources

TFDS_NAME = "cityscapes/semantic_segmentation"
TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
"""Cityscapes split names (config data.target_*_split) -> the builder's split names."""


class TfdsExamples:
    """Random access to one split of the TFDS Cityscapes builder, as (image, train ids).

    `segmentation_label` holds Cityscapes label ids (the gtFine labelIds PNGs), mapped through
    the official table like the folder layout's labels.
    """

    def __init__(self, split: str, data_dir: str = ""):
        import tensorflow_datasets as tfds  # Heavy: imported only when chosen.

        self.split = TFDS_SPLITS.get(split, split)
        try:
            self._source = tfds.data_source(
                TFDS_NAME, split=self.split, data_dir=data_dir or None, download=False
            )
        except Exception as e:  # tfds raises several types for a missing or unbuilt dataset.
            raise sources.DataError(
                f"cannot open TFDS {TFDS_NAME!r} split {self.split!r} in data_dir "
                f"{data_dir or '(default)'!r}: {e}. Build it first in the array_record format "
                "(config data.tfds_data_dir; how: metapix_jax/data/tfds_source.py, with "
                "requirements-tfds-build.txt installed)"
            ) from e

    def __len__(self) -> int:
        return len(self._source)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 HxWx3 image and uint8 HxW train ids at the native size."""
        record = self._source[index]
        ids = np.asarray(record["segmentation_label"])
        ids = ids[..., 0] if ids.ndim == 3 else ids
        return np.asarray(record["image_left"], np.uint8), labels.CITYSCAPES_ID_TO_TRAIN_ID[ids]

    def name(self, index: int) -> str:
        """Where example `index` lives, for messages."""
        return f"tfds {TFDS_NAME}[{self.split}] #{index}"
