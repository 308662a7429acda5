"""On-disk dataset layouts (GTA5, Cityscapes) and reading one example.

The same functions read the real datasets and the embedded synthetic benchmark, which is
written in the same layouts, so the benchmark exercises the real loading path.
"""

import os

import numpy as np
from PIL import Image


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


def gta5_pairs(root: str) -> list[tuple[str, str]]:
    """(image, label) paths of a GTA5-layout dataset: root/images/X.png with root/labels/X.png."""
    layout = "GTA5 (images/*.png, labels/*.png)"
    images = _require_dir(root, "images", layout)
    labels = _require_dir(root, "labels", layout)
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


def _read_png(path: str, rgb: bool) -> np.ndarray:
    """Decode an image fully (so truncation is detected now), raising DataError naming the file."""
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


def read_mask(path: str) -> np.ndarray:
    """Read a per-pixel mask PNG (nonzero = set) as bool HxW, e.g. the benchmark's harmful mask."""
    mask = _read_png(path, rgb=False)
    return (mask[..., 0] if mask.ndim == 3 else mask) != 0
