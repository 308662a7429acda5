"""Cityscapes through tensorflow-datasets' `cityscapes/semantic_segmentation` builder.

An alternative to the folder layout for the target domain (config data.target_format='tfds').
This module imports tensorflow_datasets (and with it TensorFlow), so it is imported only when
that format is chosen; the rest of the data package never imports it.

The dataset must already be built in the array_record file format (random access is what the
pipelines need), e.g. after placing the official zips in the manual dir:
`tfds build cityscapes/semantic_segmentation --manual_dir=DIR --file_format=array_record`.
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
                f"{data_dir or '(default)'!r}: {e}. Build it first with `tfds build {TFDS_NAME} "
                "--manual_dir=DIR --file_format=array_record` (config data.tfds_data_dir)"
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
