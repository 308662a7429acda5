"""What happens to one example between decoding and batching: resize, flip, normalise.

The one place that resizes: prepared records store its output, so prepared data and PNGs
give identical batches, and predict mode feeds the network exactly as training does.
"""

import numpy as np
from PIL import Image

from metapix_jax.data import normalization as normalize


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 image resized to `size` (height, width), bicubic, with PIL (the authors' setup)."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 label resized to `size` (height, width), nearest (so no invented classes)."""
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.Resampling.NEAREST))


_resize_label = resize_label  # `preprocess` has an argument of that name.


def resize(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image (bicubic) and label (nearest) resized to `size` (height, width) with PIL.

    The one resize of the project: `prepare` stores its output, so prepared data and PNGs
    give identical batches. Each is resized on its own, so an image and label of different
    sizes (a few real GTA5 pairs) both end at `size`; one already at `size` is left as is.
    """
    size = tuple(size)
    if tuple(image.shape[:2]) != size:
        image = resize_image(image, size)
    if tuple(label.shape) != size:
        label = resize_label(label, size)
    return image, label


def preprocess(
    image: np.ndarray,
    label: np.ndarray,
    size: tuple[int, int] | None,
    flip: bool,
    normalization: str,
    resize_label: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to `size` (height, width), optionally flip, normalise.

    Image bicubic, label nearest (so no invented classes), both with PIL as the authors' setup
    does, each on its own (an image and label of different sizes both end at `size`, as in
    the authors' loader). 'imagenet' matches torchvision VGG weights (RGB/255, mean/std);
    'caffe' is what the authors' code feeds (BGR, 0-255, minus the Caffe mean). `size=None`
    keeps the native size (a label of another size than its image is then brought to the
    image's size, nearest); `resize_label=False` keeps the label at its native size (the
    official evaluation). Returns float32 HxWx3 and int32 HxW.
    """
    if size is not None:
        if tuple(image.shape[:2]) != tuple(size):
            image = resize_image(image, size)
        if resize_label and tuple(label.shape) != tuple(size):
            label = _resize_label(label, size)
    elif resize_label and label.shape != image.shape[:2]:
        label = _resize_label(label, image.shape[:2])
    if flip:
        image, label = image[:, ::-1], label[:, ::-1]
    x = image.astype(np.float32)
    x = normalize.from_pixels(x[..., ::-1] if normalization == "caffe" else x, normalization)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(label, dtype=np.int32)
