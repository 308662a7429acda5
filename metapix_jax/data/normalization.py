"""Input normalisations and their inverses, without grain or any decoding library.

Kept apart from pipeline.py so that the jitted steps (FDA works on un-normalised pixels)
and the benchmarks import them on a host that has only jax: the functions use array
operators alone, so they serve numpy arrays and traced jax arrays alike.
"""

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)
NORMALIZATIONS = ("imagenet", "caffe")


def _unknown(normalization: str) -> ValueError:
    return ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def to_pixels(images, normalization: str):
    """Undoes the input normalisation: 0-255 values (BGR order stays BGR for 'caffe')."""
    if normalization == "imagenet":
        return (images * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    if normalization == "caffe":
        return images + CAFFE_MEAN_BGR
    raise _unknown(normalization)


def from_pixels(pixels, normalization: str):
    """The inverse of `to_pixels`."""
    if normalization == "imagenet":
        return (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if normalization == "caffe":
        return pixels - CAFFE_MEAN_BGR
    raise _unknown(normalization)
