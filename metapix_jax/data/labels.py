"""Label maps for Cityscapes, GTA5 and SYNTHIA.

Names, ids and colours come from the official Cityscapes table
(`cityscapesscripts.helpers.labels.labels`) rather than a hand-typed copy, so that they cannot
drift from what the official evaluator uses. The result is checked at import against the
id -> train id mapping the project relies on (REFERENCE section 6).
"""

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_TABLE

NUM_CLASSES = 19
IGNORE_LABEL = 255

_TRAIN = sorted(
    (lab for lab in _CITYSCAPES_TABLE if 0 <= lab.trainId < NUM_CLASSES),
    key=lambda lab: lab.trainId,
)

CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN)
"""The 19 train classes in train-id order."""

PALETTE: np.ndarray = np.array([lab.color for lab in _TRAIN], dtype=np.uint8)
"""19x3 uint8 Cityscapes colours, row = train id."""

TRAIN_ID_TO_CITYSCAPES_ID: np.ndarray = np.array([lab.id for lab in _TRAIN], dtype=np.uint8)
"""Train id -> Cityscapes label id, for writing labelIds PNGs (GTA5 uses the same ids)."""

CITYSCAPES_ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_LABEL, dtype=np.uint8)
"""Lookup table: Cityscapes/GTA5 label id (0..255) -> train id; unknown ids -> 255."""
CITYSCAPES_ID_TO_TRAIN_ID[TRAIN_ID_TO_CITYSCAPES_ID] = np.arange(NUM_CLASSES, dtype=np.uint8)

# SYNTHIA-RAND-CITYSCAPES class id -> train id (REFERENCE section 6). SYNTHIA labels are
# 16-bit PNGs, hence a table over all 16-bit values.
_SYNTHIA_IDS = (3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11)
SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = np.full(65536, IGNORE_LABEL, dtype=np.uint8)
"""Lookup table: SYNTHIA class id (0..65535) -> train id; unknown ids -> 255."""
SYNTHIA_ID_TO_TRAIN_ID[list(_SYNTHIA_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)

# The project's mapping (REFERENCE section 6); the official table must agree with it.
_EXPECTED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_EXPECTED_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
assert CLASS_NAMES == _EXPECTED_NAMES, CLASS_NAMES
assert tuple(TRAIN_ID_TO_CITYSCAPES_ID.tolist()) == _EXPECTED_IDS, TRAIN_ID_TO_CITYSCAPES_ID
assert PALETTE.shape == (NUM_CLASSES, 3)


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Map an HxW train-id map to an HxWx3 uint8 image in the Cityscapes colours.

    Ignore (and any other out-of-range value) is drawn black so it stands out from every class.
    """
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[np.asarray(train_ids, dtype=np.uint8)]
