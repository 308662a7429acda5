"""On-disk dataset layouts (GTA5, SYNTHIA, Cityscapes), list files and reading one example.

The same functions read the real datasets and the embedded synthetic benchmark, which is
written in the same layouts, so the benchmark exercises the real loading path.
"""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from metapix_jax.data import labels


class DataError(ValueError):
    """A dataset is missing, incomplete or unreadable; the message names the path at fault."""


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


def _is_16bit_color_png(path: str) -> bool:
    """True for 16-bit RGB(A) PNGs (SYNTHIA labels), which PIL would cut to their high bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e}") from e
    return head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 6)


def _read_png_16bit(path: str) -> np.ndarray:
    """A 16-bit colour PNG as uint16 HxWxC in file channel order (R first), with OpenCV."""
    import cv2  # Only SYNTHIA's labels need it.

    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        raise DataError(f"cannot read {path!r} as a 16-bit colour PNG")
    return array[..., [2, 1, 0, 3][: array.shape[-1]]]  # OpenCV's BGR(A) -> RGB(A).


def _read_png(path: str, rgb: bool) -> np.ndarray:
    """Decode an image fully (so truncation is detected now), raising DataError naming the file."""
    if not rgb and _is_16bit_color_png(path):
        return _read_png_16bit(path)
    try:
        with Image.open(path) as im:
            im.load()
            if rgb:
                return np.asarray(im.convert("RGB"))
            return np.asarray(im)  # 'P' (GTA5) gives the indices, i.e. the label ids.
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read {path!r}: {e}") from e


def read_example(
    image_path: str, label_path: str, id_to_train_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Read an RGB uint8 HxWx3 image and its uint8 HxW train-id map.

    Label ids are mapped through the lookup table `id_to_train_id`; ids beyond the table map to
    its last entry (255 for the tables in `labels`). Multi-channel labels (SYNTHIA) use channel 0.
    """
    image = _read_png(image_path, rgb=True)
    ids = _read_png(label_path, rgb=False)
    if ids.ndim == 3:
        ids = ids[..., 0]
    if ids.shape != image.shape[:2]:
        raise DataError(
            f"label {label_path!r} is {ids.shape[1]}x{ids.shape[0]} but image {image_path!r} "
            f"is {image.shape[1]}x{image.shape[0]} (width x height)"
        )
    lut = np.asarray(id_to_train_id)
    return image, lut[np.minimum(ids, len(lut) - 1)].astype(np.uint8)


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
        """uint8 HxWx3 image and uint8 HxW train ids at the native size."""
        return read_example(*self.pairs[index], self.id_to_train_id)

    def name(self, index: int) -> str:
        """The image file, for messages."""
        return self.pairs[index][0]


def read_mask(path: str) -> np.ndarray:
    """Read a per-pixel mask PNG (nonzero = set) as bool HxW, e.g. the benchmark's harmful mask."""
    mask = _read_png(path, rgb=False)
    return (mask[..., 0] if mask.ndim == 3 else mask) != 0
