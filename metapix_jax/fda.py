"""FDA (Yang & Soatto 2020): source images with a target image's low-frequency amplitude.

The FDA + supervision baseline of Tables 1-2 trains jointly on source images restyled
this way: the amplitude spectrum's low band (its size set by beta) carries the global
colour and lighting, the phase carries the layout, so swapping the band moves the
source's look towards the target while keeping what the labels describe. It runs inside
the jitted step on the un-normalised image; the donors are the batch's target images.
"""

import jax.numpy as jnp
import numpy as np

from metapix_jax.data.normalization import from_pixels, to_pixels


def band_half_width(height: int, width: int, beta: float) -> int:
    """b = floor(min(H, W) * beta), as in FDA's code; b = 0 swaps nothing."""
    if not 0.0 <= beta <= 0.5:
        raise ValueError(f"fda.beta must be in [0, 0.5], got {beta}")
    return int(np.floor(min(height, width) * beta))


def low_frequency_mask(height: int, width: int, beta: float) -> np.ndarray:
    """[H, W] bool: the frequencies (ky, kx) with |ky| < b and |kx| < b (FFT index order).

    The band is symmetric under k -> -k, so the swapped spectrum stays that of a real
    image: 2b - 1 frequencies per axis, FDA's centred square after an fftshift.
    """
    b = band_half_width(height, width, beta)
    ky, kx = np.arange(height), np.arange(width)
    dy, dx = np.minimum(ky, height - ky), np.minimum(kx, width - kx)
    return (dy[:, None] < b) & (dx[None, :] < b)


def swap_low_amplitude(source: jnp.ndarray, target: jnp.ndarray, beta: float) -> jnp.ndarray:
    """[B, H, W, C] source images with the low-band amplitude of `target` (same shape).

    Source phase everywhere, target amplitude inside the band, source amplitude outside.
    """
    mask = low_frequency_mask(source.shape[1], source.shape[2], beta)[None, :, :, None]
    f_source = jnp.fft.fft2(source, axes=(1, 2))
    f_target = jnp.fft.fft2(target, axes=(1, 2))
    amplitude = jnp.where(mask, jnp.abs(f_target), jnp.abs(f_source))
    phase = jnp.angle(f_source)
    return jnp.fft.ifft2(amplitude * jnp.exp(1j * phase), axes=(1, 2)).real.astype(source.dtype)


def stylize(
    source: jnp.ndarray, target: jnp.ndarray, beta: float, normalization: str
) -> jnp.ndarray:
    """Normalised source images restyled by the target images (donor i mod B_t), clipped."""
    donors = jnp.take(target, jnp.arange(source.shape[0]) % target.shape[0], axis=0)
    swapped = swap_low_amplitude(
        to_pixels(source, normalization), to_pixels(donors, normalization), beta
    )
    return from_pixels(jnp.clip(swapped, 0.0, 255.0), normalization).astype(source.dtype)
