"""On-disk dataset layouts (GTA5, SYNTHIA, Cityscapes), list files and reading one example.

The same functions read the real datasets and the embedded synthetic benchmark, which is
written in the same layouts, so the benchmark exercises the real loading path.

Reading is strict about damage and lenient about real-world variety. Every file that cannot be
read as what it should be (missing, empty, cut anywhere, a PNG chunk whose checksum fails, a
label that is not a PNG, a colour-coded GTA5/Cityscapes label) is a `DataError` naming it, so
`data.skip_bad_files` can skip it and `main.py` reports it in one line. Labels decode from any
PNG bit depth (1 to 16 bits, palette, grey, colour); an image and label of different sizes
are not an error (see `read_example`).
"""

import dataclasses
import os
import threading
from collections.abc import Sequence

import numpy as np
from absl import logging

from metapix_jax import errors
from metapix_jax.data import labels
from metapix_jax.data.png import read_image, read_label_ids, read_png, read_png_header

DataError = errors.DataError  # Raised by every reader here; main.py prints it in one line.


def _listing(root: str) -> str:
    """Short description of what a folder holds, for error messages."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return "nothing (not readable)"
    if not names:
        return "nothing (empty)"
    return ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")


def _require_dir(root: str, sub: str, layout: str) -> str:
    """Return root/sub, or raise a DataError saying which layout was expected and what was found."""
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root!r} does not exist (expected the {layout} layout)")
    path = os.path.join(root, sub)
    if not os.path.isdir(path):
        raise DataError(
            f"{path!r} is missing: expected the {layout} layout under {root!r}, "
            f"found: {_listing(root)}"
        )
    return path


def _pairs_by_name(root: str, image_dir: str, label_dir: str, layout: str) -> list[tuple[str, str]]:
    """(image, label) paths where root/image_dir/X.png has its label at root/label_dir/X.png."""
    images = _require_dir(root, image_dir, layout)
    labels = _require_dir(root, label_dir, layout)
    pairs = []
    for name in sorted(os.listdir(images)):
        if not name.endswith(".png"):
            continue
        label = os.path.join(labels, name)
        if not os.path.isfile(label):
            raise DataError(f"image {os.path.join(images, name)!r} has no label {label!r}")
        pairs.append((os.path.join(images, name), label))
    if not pairs:
        raise DataError(f"no .png images in {images!r}")
    return pairs


def gta5_pairs(root: str) -> list[tuple[str, str]]:
    """(image, label) paths of a GTA5-layout dataset: root/images/X.png with root/labels/X.png."""
    return _pairs_by_name(root, "images", "labels", "GTA5 (images/*.png, labels/*.png)")


def synthia_pairs(root: str) -> list[tuple[str, str]]:
    """(image, label) paths of SYNTHIA-RAND-CITYSCAPES: root/RGB/X.png with root/GT/LABELS/X.png.

    The labels are 16-bit PNGs with the class id in the first channel (`read_example` takes it).
    """
    layout = "SYNTHIA-RAND-CITYSCAPES (RGB/*.png, GT/LABELS/*.png)"
    return _pairs_by_name(root, "RGB", os.path.join("GT", "LABELS"), layout)


SOURCE_KINDS = ("gta5", "synthia")


def id_to_train_id(kind: str) -> np.ndarray:
    """The label id -> train id table of a source layout (config data.source_kind)."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"config data.source_kind must be one of {SOURCE_KINDS}, got {kind!r}")
    return labels.SYNTHIA_ID_TO_TRAIN_ID if kind == "synthia" else labels.CITYSCAPES_ID_TO_TRAIN_ID


def source_pairs(kind: str, root: str) -> list[tuple[str, str]]:
    """The (image, label) paths of a source dataset of layout `kind` (config data.source_kind)."""
    if kind == "gta5":
        return gta5_pairs(root)
    if kind == "synthia":
        return synthia_pairs(root)
    raise ValueError(f"config data.source_kind must be one of {SOURCE_KINDS}, got {kind!r}")


def cityscapes_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """(image, labelIds) paths of one Cityscapes split, sorted by city then frame."""
    layout = "Cityscapes (leftImg8bit/{split}/{city}/*_leftImg8bit.png, gtFine/...)"
    images = _require_dir(root, os.path.join("leftImg8bit", split), layout)
    labels = _require_dir(root, os.path.join("gtFine", split), layout)
    suffix = "_leftImg8bit.png"
    pairs = []
    for city in sorted(os.listdir(images)):
        if not os.path.isdir(os.path.join(images, city)):
            continue
        for name in sorted(os.listdir(os.path.join(images, city))):
            if not name.endswith(suffix):
                continue
            stem = name[: -len(suffix)]
            label = os.path.join(labels, city, f"{stem}_gtFine_labelIds.png")
            if not os.path.isfile(label):
                raise DataError(
                    f"image {os.path.join(images, city, name)!r} has no label {label!r}"
                )
            pairs.append((os.path.join(images, city, name), label))
    if not pairs:
        raise DataError(f"split {split!r} of {root!r} is empty: no *{suffix} under {images!r}")
    return pairs


def read_list(list_file: str) -> list[tuple[int, str]]:
    """(line number, entry) of a list file: one name or relative path per line; blank lines and
    lines starting with '#' are skipped."""
    try:
        with open(list_file) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read list file {list_file!r}: {e}") from e
    entries = [(i + 1, line.strip()) for i, line in enumerate(lines)]
    return [(n, e) for n, e in entries if e and not e.startswith("#")]


def _names_of(image_path: str, root: str) -> list[str]:
    """The spellings a list file may use for an image: its path relative to the dataset root,
    to each folder between (e.g. leftImg8bit/train/), or its bare file name."""
    rel = os.path.relpath(image_path, root).replace(os.sep, "/")
    parts = rel.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def restrict_to_list(
    pairs: Sequence[tuple[str, str]], root: str, list_file: str
) -> list[tuple[str, str]]:
    """The pairs named in `list_file`, in the list's order ('' = all pairs, unchanged).

    An entry matches an image by its path relative to `root` or any of its trailing parts
    (so `00001.png`, `aachen/aachen_000000_000019_leftImg8bit.png` and the full relative path
    all work). An entry that matches no image is an error naming the list file and line.
    """
    if not list_file:
        return list(pairs)
    index = {}
    for pair in pairs:
        for name in _names_of(pair[0], root):
            index.setdefault(name, pair)
    chosen = []
    for line_number, entry in read_list(list_file):
        pair = index.get(entry.replace(os.sep, "/").removeprefix("./"))
        if pair is None:
            raise DataError(
                f"{list_file}:{line_number}: {entry!r} is not an image of the dataset at {root!r}"
            )
        chosen.append(pair)
    if not chosen:
        raise DataError(f"list file {list_file!r} names no image")
    return chosen


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_once(kind: str, path: str, message: str, *args: object) -> None:
    """Log a warning about `path` once per process and kind: streams read a file every epoch."""
    with _warned_lock:
        if (kind, path) in _warned:
            return
        _warned.add((kind, path))
    logging.warning(message, *args)


def map_ids(ids: np.ndarray, id_to_train_id: np.ndarray) -> np.ndarray:
    """uint8 train ids of an HxW id map through the lookup table; ids beyond it (and negative
    ones) take its last entry (255, ignore, for the tables in `labels`).

    Clips only where the id type can exceed the table: `np.minimum(uint8 ids, 65535)` is an
    OverflowError under NumPy 2, which is how 8-bit SYNTHIA labels used to crash.
    """
    lut = np.asarray(id_to_train_id)
    last = len(lut) - 1
    if ids.dtype.kind == "i":
        ids = np.where(ids < 0, last, np.minimum(ids, last))
    elif np.iinfo(ids.dtype).max > last:
        ids = np.minimum(ids, last)
    return lut[ids].astype(np.uint8)


def read_example(
    image_path: str,
    label_path: str,
    id_to_train_id: np.ndarray,
    first_channel: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an RGB uint8 HxWx3 image and its uint8 train-id map, each at its own size.

    Label ids are mapped through the lookup table `id_to_train_id` (`map_ids`). Multi-channel
    labels: see `read_label_ids`; `first_channel=None` takes the first channel for tables over
    16-bit ids (SYNTHIA's) and requires one channel (or equal ones) for 8-bit tables.

    An image and label of different sizes are returned as they are, with a warning (once per
    file): real GTA5 has a few such pairs, and the authors' loader resizes each to the training
    size separately, which `transforms.preprocess` does. A label with no valid id at all (every
    pixel ignored) is also a warning: it is what a 16-bit label with scaled values (say id *
    257) rather than raw ids decodes to.
    """
    lut = np.asarray(id_to_train_id)
    image = read_image(image_path)
    ids = read_label_ids(label_path, len(lut) > 256 if first_channel is None else first_channel)
    train_ids = map_ids(ids, lut)
    if ids.shape != image.shape[:2]:
        warn_once(
            "size",
            image_path,
            "image %r is %dx%d but its label %r is %dx%d (width x height): each is resized to "
            "the training size separately (image bicubic, label nearest), as the authors' loader "
            "does; under data.eval_protocol='full' the label keeps its own size",
            image_path,
            image.shape[1],
            image.shape[0],
            label_path,
            ids.shape[1],
            ids.shape[0],
        )
    if train_ids.size and train_ids.min() == 255:
        warn_once(
            "no valid id",
            label_path,
            "label %r holds no valid class id: every pixel is ignored (max id %d). Labels must "
            "hold raw ids; a 16-bit label with scaled values (e.g. id * 257) decodes like this",
            label_path,
            int(ids.max()),
        )
    return image, train_ids


@dataclasses.dataclass(frozen=True, eq=False)
class PngExamples:
    """Random access to the examples of a list of (image, label) PNG pairs.

    The pipelines read every dataset through this small interface (`len`, `read`, `name`), so
    PNG folders, prepared array_record files and TFDS go through the same stream code.
    """

    pairs: tuple[tuple[str, str], ...]
    id_to_train_id: np.ndarray

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 HxWx3 image and uint8 HxW train ids, each at its native size (see
        `read_example` for a pair whose sizes differ)."""
        return read_example(*self.pairs[index], self.id_to_train_id)

    def label_name(self, index: int) -> str:
        """The label file, for messages about the label."""
        return self.pairs[index][1]

    def label_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) of label `index` from its PNG header (None if unreadable): lets an
        error about one label's size compare it with all the others without decoding them."""
        try:
            header = read_png_header(self.pairs[index][1])
        except DataError:
            return None
        return header.height, header.width

    def name(self, index: int) -> str:
        """The image file, for messages."""
        return self.pairs[index][0]


def read_mask(path: str) -> np.ndarray:
    """Read a per-pixel mask PNG (nonzero = set) as bool HxW, e.g. the benchmark's harmful mask."""
    mask = read_png(path, rgb=False)
    return (mask[..., 0] if mask.ndim == 3 else mask) != 0
