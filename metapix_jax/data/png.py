"""PNG files read strictly: every chunk checked before decoding, any damage a DataError.

The decoders do not check everything (Pillow skips the image data's checksum and can return
wrong pixels for some damage; OpenCV's libpng ignores damaged ancillary chunks), and a
damaged label must not train as a wrong label. So a PNG is checked whole first (signature,
header, every chunk's CRC-32, the end marker: about a millisecond per megabyte), then
decoded: with Pillow, or with OpenCV for 16-bit colour labels (SYNTHIA's), which Pillow
would cut to 8 bits. Labels decode from any PNG bit depth (1 to 16 bits, palette, grey,
colour).
"""

import dataclasses
import io
import struct
import zlib

import numpy as np
from PIL import Image

from metapix_jax.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sIIBBBBB")  # length, type, width, height, depth, colour, 3 methods
_HEADER_BYTES = len(PNG_SIGNATURE) + _IHDR.size + 4  # up to the end of IHDR's checksum
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
"""PNG colour type -> the bit depths the PNG specification allows for it."""


@dataclasses.dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR chunk says: enough to tell a label's size and how to decode it."""

    width: int
    height: int
    bit_depth: int
    color_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA


def _read_bytes(path: str, count: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(count)
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e}") from e


def _parse_header(path: str, data: bytes) -> PngHeader:
    """The IHDR at the start of `data` (the file's first bytes), checked, or a DataError."""
    if not data:
        raise DataError(f"cannot read {path!r}: the file is empty")
    if data[: len(PNG_SIGNATURE)] != PNG_SIGNATURE[: len(data)]:
        raise DataError(f"cannot read {path!r}: not a PNG file")
    if len(data) < _HEADER_BYTES:
        raise DataError(
            f"cannot read {path!r}: truncated inside the PNG header ({len(data)} bytes)"
        )
    length, kind, width, height, depth, colour, *methods = _IHDR.unpack_from(data, 8)
    (crc,) = struct.unpack_from(">I", data, _HEADER_BYTES - 4)
    if kind != b"IHDR" or length != 13 or zlib.crc32(data[12 : _HEADER_BYTES - 4]) != crc:
        raise DataError(f"cannot read {path!r}: damaged PNG header (IHDR chunk or its checksum)")
    compression, filtering, interlace = methods
    valid_depth = depth in _BIT_DEPTHS.get(colour, ())
    if not (width and height and valid_depth) or compression or filtering or interlace > 1:
        raise DataError(
            f"cannot read {path!r}: invalid PNG header ({width}x{height}, bit depth {depth}, "
            f"colour type {colour})"
        )
    return PngHeader(width, height, depth, colour)


def read_png_header(path: str) -> PngHeader:
    """The IHDR of the PNG at `path` (33 bytes read), or a DataError naming the file.

    Cheap enough to ask every label of a split for its size.
    """
    return _parse_header(path, _read_bytes(path, _HEADER_BYTES))


def _check_png(path: str, data: bytes) -> PngHeader:
    """The header of a whole PNG file in `data`, after checking every chunk, or a DataError.

    The decoders do not check everything: Pillow skips the checksum of the image data and,
    when a chunk length is damaged too, can return wrong pixels without an error (found by
    tests/test_data_fuzz.py); OpenCV's libpng ignores damage in ancillary chunks. A damaged
    label must not train as a wrong label, so every chunk's CRC-32 is checked here (about a
    millisecond per megabyte) and a file cut anywhere, even inside its last chunk, is an error.
    """
    header = _parse_header(path, data)
    view = memoryview(data)
    position, image_data = len(PNG_SIGNATURE), False
    while True:
        if position + 8 > len(data):
            raise DataError(f"cannot read {path!r}: truncated PNG (no IEND chunk at the end)")
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if end > len(data):
            raise DataError(
                f"cannot read {path!r}: truncated PNG (chunk {kind!r} at byte {position} needs "
                f"{end} bytes, the file has {len(data)})"
            )
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[position + 4 : end - 4]) != crc:
            raise DataError(
                f"cannot read {path!r}: damaged PNG (checksum of chunk {kind!r} at byte {position})"
            )
        image_data |= kind == b"IDAT"
        if kind == b"IEND":
            break
        position = end
    if not image_data:
        raise DataError(f"cannot read {path!r}: PNG without image data (no IDAT chunk)")
    return header


def _decode_error(path: str, error: Exception) -> DataError:
    """The DataError for a file a decoder refused: one line naming the file and the reason."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return DataError(f"cannot read {path!r}: {reason}")


def _decode_png_16bit(path: str, data: bytes) -> np.ndarray:
    """A 16-bit colour (or grey + alpha) PNG as uint16 HxWxC, R first, with OpenCV.

    Pillow would cut these to their high bytes (SYNTHIA's labels, whose ids are in the low
    byte, would become all zero), hence OpenCV. Grey + alpha comes back as grey, grey, grey,
    alpha, so channel 0 is the grey value either way.
    """
    import cv2  # Only 16-bit colour labels (SYNTHIA) need it.

    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # e.g. a header claiming more pixels than OpenCV accepts
        raise _decode_error(path, e) from e
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        raise DataError(f"cannot read {path!r}: not a complete 16-bit colour PNG")
    return array[..., [2, 1, 0, 3][: array.shape[-1]]]  # OpenCV's BGR(A) -> RGB(A).


def _decode_pillow(path: str, data: bytes, convert: str | None) -> np.ndarray:
    """Decode fully with Pillow (so truncation is detected now), optionally converted.

    Any exception of the decoder is this file's fault (Pillow raises OSError, SyntaxError,
    ValueError, EOFError, DecompressionBombError, ... on malformed input), so every one
    becomes a DataError naming the file, which `skip_bad_files` can skip.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode.startswith("I;16") and convert == "RGB":
                # Pillow clips 16-bit grey to 255 when converting; keep the high byte, as
                # it does for 16-bit colour.
                grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert(convert) if convert else im)
    except Exception as e:  # Deliberately broad: see the docstring.
        raise _decode_error(path, e) from e


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 HxWx3, or a DataError naming the file.

    Any format Pillow reads (PNG files are checked whole first, see `_check_png`); grey and
    palette images are expanded, alpha is dropped, 16-bit samples keep their high byte.
    """
    data = _read_bytes(path)
    if data.startswith(PNG_SIGNATURE[:1]):
        _check_png(path, data)
    return _decode_pillow(path, data, "RGB")


def read_png(path: str, rgb: bool) -> np.ndarray:
    """Image (`rgb`) or raw label/mask pixels; labels and masks must be PNGs (lossless)."""
    if rgb:
        return read_image(path)
    data = _read_bytes(path)
    header = _check_png(path, data)
    if header.bit_depth == 16 and header.color_type in (2, 4, 6):
        return _decode_png_16bit(path, data)
    array = _decode_pillow(path, data, None)  # 'P' (GTA5) gives the indices, i.e. the ids.
    return array.astype(np.uint8) if array.dtype == bool else array  # 1-bit: ids 0 and 1


def read_label_ids(path: str, first_channel: bool) -> np.ndarray:
    """The label ids of a label PNG as an unsigned HxW array, or a DataError naming the file.

    Single-channel labels (palette 'P' as GTA5 ships them, 8- or 16-bit grey) hold the ids.
    Multi-channel labels: with `first_channel` (SYNTHIA, whose 16-bit RGB labels hold the
    class in the first channel, the instance in the second) the first channel is the id,
    whatever the bit depth. Otherwise (GTA5, Cityscapes) only a grey image stored as colour
    (equal colour channels) is accepted: differing channels mean a colour-coded label,
    whose colours are not ids, and decoding them as ids would silently give wrong classes.
    """
    ids = read_png(path, rgb=False)
    if ids.ndim == 3:
        if not first_channel:
            colour = ids[..., :3] if ids.shape[-1] >= 3 else ids[..., :1]
            if not (colour == colour[..., :1]).all():
                raise DataError(
                    f"cannot read {path!r} as a label: it has {ids.shape[-1]} channels that "
                    "differ (a colour-coded label?); GTA5 and Cityscapes labels hold the label "
                    "ids in one channel (palette or greyscale PNG)"
                )
        ids = ids[..., 0]
    if ids.ndim != 2 or ids.dtype.kind not in "ui":
        raise DataError(f"cannot read {path!r} as a label: pixels of type {ids.dtype}")
    return ids
