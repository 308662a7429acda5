"""Fuzzing the example readers with damaged and re-encoded files of every dataset kind (CPU).

Each kind (GTA5 palette and greyscale labels, 16-bit greyscale labels, SYNTHIA 16-bit RGB
labels, Cityscapes labelIds, RGB images) starts from a small valid file. Byte damage
(truncation at every length, flipped bytes) must give a `DataError` naming the damaged file or
exactly the original decode; re-encodings (other bit depth, channel count, size) must give the
decode stated for each one, or the `DataError` stated for it. Never another exception: those
are tracebacks that `data.skip_bad_files` cannot skip. Seeded; a few seconds.
"""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from metapix_jax.data import labels, png, sources, transforms

CS = labels.CITYSCAPES_ID_TO_TRAIN_ID
SYN = labels.SYNTHIA_ID_TO_TRAIN_ID
SHAPE = (12, 16)  # height, width
RNG = np.random.default_rng(15)
IMAGE = RNG.integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
CS_IDS = RNG.choice([0, 4, 7, 8, 11, 21, 23, 24, 26, 33, 34, 200], SHAPE).astype(np.uint8)
SYN_IDS = RNG.choice([0, 1, 2, 3, 10, 13, 21, 22], SHAPE).astype(np.uint16)
WIDE_IDS = RNG.choice([7, 26, 263, 300, 4000, 65535], SHAPE).astype(np.uint16)  # 16-bit grey


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): HxW grey, HxWx2 grey +
    alpha, HxWx3 RGB or HxWx4 RGBA."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        png.PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def pil_png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    out = io.BytesIO()
    im.save(out, format="PNG", **save)
    return out.getvalue()


# A palette whose colours have differing channels, like GTA5's (Cityscapes colours).
PALETTE = [v for i in range(256) for v in (i, (i * 7) % 256, 255 - i)]


def table_of(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The expected train ids, written independently of the reader: ids beyond the table
    take its last entry."""
    return table[np.minimum(ids.astype(np.int64), len(table) - 1)].astype(np.uint8)


def palette_png(ids: np.ndarray) -> bytes:
    """An 8-bit palette PNG whose indices are `ids`, as GTA5's labels."""
    im = Image.frombytes("P", ids.shape[::-1], ids.astype(np.uint8).tobytes())
    im.putpalette(PALETTE)
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


# kind -> (label bytes, id table, expected train ids)
SYN_RGB = np.stack([SYN_IDS, SYN_IDS * 0 + 1000, SYN_IDS * 0], -1)  # class, instance, 0
LABELS = {
    "gta5_palette": (palette_png(CS_IDS), CS, table_of(CS_IDS, CS)),
    "gta5_grey": (pil_png(CS_IDS), CS, table_of(CS_IDS, CS)),
    "grey16": (pil_png(WIDE_IDS), CS, table_of(WIDE_IDS, CS)),
    "synthia16_rgb": (png16(SYN_RGB), SYN, table_of(SYN_IDS, SYN)),
    "cityscapes_labelIds": (pil_png(CS_IDS), CS, table_of(CS_IDS, CS)),
}
IMAGE_PNG = pil_png(IMAGE)
LABEL_NAMES = {"cityscapes_labelIds": "aachen_000000_000019_gtFine_labelIds.png"}


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def check(read, damaged: str, expected: tuple[np.ndarray, np.ndarray]) -> str:
    """'error' (a DataError naming `damaged`, one line) or 'same' (the expected decode)."""
    try:
        image, label = read()
    except sources.DataError as e:
        assert damaged in str(e) and "\n" not in str(e), str(e)
        return "error"
    np.testing.assert_array_equal(image, expected[0])
    np.testing.assert_array_equal(label, expected[1])
    return "same"


def damaged_versions(data: bytes, rng: np.random.Generator):
    """(what, damaged bytes): cut at every length inside the header and the last chunks, and
    at every fifth one between; then one to three flipped bytes at random places."""
    for n in range(len(data)):
        if n < 48 or n % 5 == 0 or n > len(data) - 24:
            yield f"truncated to {n} bytes", data[:n]
    for _ in range(60):
        damaged = bytearray(data)
        places = rng.choice(len(data), size=int(rng.integers(1, 4)), replace=False)
        for i in places:
            damaged[i] ^= int(rng.integers(1, 256))
        yield f"bytes {sorted(places.tolist())} flipped", bytes(damaged)


@pytest.mark.parametrize("kind", sorted(LABELS) + ["rgb_image"])
def test_damaged_files_give_a_data_error_naming_the_file_or_the_right_decode(tmp_path, kind):
    rng = np.random.default_rng(sorted(LABELS).index(kind) if kind in LABELS else 99)
    label_bytes, table, train_ids = LABELS.get(kind, LABELS["gta5_palette"])
    image = write(f"{tmp_path}/image.png", IMAGE_PNG)
    label = write(f"{tmp_path}/{LABEL_NAMES.get(kind, 'label.png')}", label_bytes)
    victim, original = (image, IMAGE_PNG) if kind == "rgb_image" else (label, label_bytes)
    assert check(lambda: sources.read_example(image, label, table), "", (IMAGE, train_ids))
    outcomes = {"error": 0, "same": 0}
    versions = list(damaged_versions(original, rng))
    for what, data in versions:
        write(victim, data)
        try:
            outcome = check(lambda: sources.read_example(image, label, table), victim,
                            (IMAGE, train_ids))  # fmt: skip
        except AssertionError as e:
            raise AssertionError(f"{kind}, {what}: {e}") from e
        outcomes[outcome] += 1
    # Stronger than "an error or the right decode": the readers check every PNG chunk's
    # checksum, so any cut or flipped byte is an error (the decoders alone missed some, and
    # once returned wrong pixels for a flipped length and data byte).
    assert outcomes == {"error": len(versions), "same": 0}, outcomes


def _label_case(tmp_path, data: bytes, table: np.ndarray, name: str = "label.png"):
    image = write(f"{tmp_path}/image.png", IMAGE_PNG)
    label = write(f"{tmp_path}/{name}", data)
    return image, label, lambda: sources.read_example(image, label, table)


# Re-encoded labels: (label bytes, table, expected train ids or None for a DataError).
def _reencoded_labels():
    cs_ids16 = CS_IDS.astype(np.uint16)
    syn8 = SYN_IDS.astype(np.uint8)
    colour = np.asarray(Image.open(io.BytesIO(LABELS["gta5_palette"][0])).convert("RGB"))
    small = CS_IDS % 16  # fits 4 bits
    return {
        # bit depth
        "8-bit ids as 16-bit grey": (pil_png(cs_ids16), CS, table_of(CS_IDS, CS)),
        "16-bit scaled ids (id * 257)": (pil_png(cs_ids16 * 257), CS, table_of(cs_ids16 * 257, CS)),
        "1-bit": (pil_png(CS_IDS % 2 == 1), CS, table_of(CS_IDS % 2, CS)),
        "4-bit palette": (_palette_4bit(small), CS, table_of(small, CS)),
        "SYNTHIA 8-bit RGB": (
            pil_png(np.stack([syn8, syn8 * 0 + 7, syn8 * 0], -1)),
            SYN,
            table_of(SYN_IDS, SYN),
        ),  # fmt: skip
        "SYNTHIA 8-bit grey": (pil_png(syn8), SYN, table_of(SYN_IDS, SYN)),
        "SYNTHIA 16-bit grey": (png16(SYN_IDS), SYN, table_of(SYN_IDS, SYN)),
        # channel count
        "grey ids stored as RGB": (
            pil_png(np.repeat(CS_IDS[..., None], 3, -1)),
            CS,
            table_of(CS_IDS, CS),
        ),  # fmt: skip
        "grey ids with alpha": (pil_png(CS_IDS, "LA"), CS, table_of(CS_IDS, CS)),
        "colour-coded GTA5 label": (pil_png(colour), CS, None),
        "colour-coded label with alpha": (pil_png(colour, "RGBA"), CS, None),
        "SYNTHIA 16-bit RGBA": (
            png16(np.concatenate([SYN_RGB, SYN_RGB[..., :1]], -1)),
            SYN,
            table_of(SYN_IDS, SYN),
        ),  # fmt: skip
        "SYNTHIA 16-bit grey + alpha": (
            png16(np.stack([SYN_IDS, SYN_IDS * 0 + 9], -1)),
            SYN,
            table_of(SYN_IDS, SYN),
        ),  # fmt: skip
        "16-bit grey + alpha, 8-bit table": (
            png16(np.stack([WIDE_IDS, WIDE_IDS], -1)),
            CS,
            table_of(WIDE_IDS, CS),
        ),  # fmt: skip
        # not a PNG: a lossy format cannot hold ids
        "JPEG label": (_jpeg(CS_IDS), CS, None),
    }


def _palette_4bit(ids: np.ndarray) -> bytes:
    im = Image.frombytes("P", ids.shape[::-1], ids.astype(np.uint8).tobytes())
    im.putpalette(PALETTE[: 16 * 3])
    out = io.BytesIO()
    im.save(out, format="PNG", bits=4)
    assert out.getvalue()[24] == 4  # bit depth 4 indeed
    return out.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=100, subsampling=0)
    return out.getvalue()


@pytest.mark.parametrize("case", sorted(_reencoded_labels()))
def test_reencoded_labels_decode_as_stated_or_fail_cleanly(tmp_path, case, caplog):
    data, table, expected = _reencoded_labels()[case]
    _, label, read = _label_case(tmp_path, data, table)
    if expected is None:
        with pytest.raises(sources.DataError, match="label.png"):
            read()
        return
    assert check(read, label, (IMAGE, expected)) == "same"
    no_valid_id = (expected == 255).all()
    assert ("holds no valid class id" in caplog.text) == no_valid_id, caplog.text
    if no_valid_id:  # scaled 16-bit ids and the 1-bit label: warned once per file
        read()
        assert caplog.text.count("holds no valid class id") == 1


def _image_versions():
    grey = np.asarray(Image.fromarray(IMAGE).convert("L"))
    palette_image = Image.fromarray(IMAGE).quantize(16)
    indices = np.asarray(palette_image)
    colours = np.array(palette_image.getpalette(), np.uint8).reshape(-1, 3)
    out = io.BytesIO()
    palette_image.save(out, format="PNG")
    return {
        "grey": (pil_png(grey), np.repeat(grey[..., None], 3, -1)),
        "RGBA": (pil_png(IMAGE, "RGBA"), IMAGE),
        "palette": (out.getvalue(), colours[indices]),
        "16-bit RGB": (png16(IMAGE.astype(np.uint16) * 256 + 200), IMAGE),  # high byte kept
        "16-bit RGBA": (
            png16(np.concatenate([IMAGE, IMAGE[..., :1]], -1).astype(np.uint16) * 257),
            IMAGE,
        ),
        "16-bit grey": (png16(grey.astype(np.uint16) * 257), np.repeat(grey[..., None], 3, -1)),
        "JPEG named .png": (_jpeg(IMAGE), None),  # images may be any format Pillow reads
    }


@pytest.mark.parametrize("case", sorted(_image_versions()))
def test_reencoded_images_decode_to_what_they_depict(tmp_path, case):
    data, expected = _image_versions()[case]
    image = write(f"{tmp_path}/image.png", data)
    label = write(f"{tmp_path}/label.png", LABELS["gta5_grey"][0])
    got, train_ids = sources.read_example(image, label, CS)
    if expected is None:  # lossy: the decoder's pixels, close to the original
        assert got.shape == IMAGE.shape and np.abs(got.astype(int) - IMAGE).mean() < 5
    else:
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(train_ids, LABELS["gta5_grey"][2])


@pytest.mark.parametrize("which", ["image", "label"])
def test_resized_files_keep_their_size_and_train_at_the_training_size(tmp_path, which, caplog):
    other = (SHAPE[0] + 3, SHAPE[1] - 5)
    image_array = IMAGE
    label_ids = CS_IDS
    if which == "image":
        image_array = transforms.resize_image(IMAGE, other)
    else:
        label_ids = np.asarray(Image.fromarray(CS_IDS).resize(other[::-1], Image.NEAREST))
    image = write(f"{tmp_path}/image.png", pil_png(image_array))
    label = write(f"{tmp_path}/label.png", pil_png(label_ids))
    got_image, got_label = sources.read_example(image, label, CS)
    np.testing.assert_array_equal(got_image, image_array)
    np.testing.assert_array_equal(got_label, table_of(label_ids, CS))
    assert caplog.text.count("each is resized to the training size separately") == 1
    x, y = transforms.preprocess(got_image, got_label, (8, 8), False, "caffe")
    assert x.shape == (8, 8, 3) and y.shape == (8, 8)


def test_huge_header_is_a_data_error(tmp_path):
    """A header claiming 100000 x 100000 pixels (with a valid checksum): the decoders refuse
    it with their own exception types (a decompression-bomb error, cv2.error)."""
    for depth, colour in [(8, 0), (16, 2)]:
        header = struct.pack(">IIBBBBB", 100_000, 100_000, depth, colour, 0, 0, 0)
        data = png.PNG_SIGNATURE + _chunk(b"IHDR", header) + LABELS["grey16"][0][33:]
        _, label, read = _label_case(tmp_path, data, CS)
        with pytest.raises(sources.DataError, match="label.png"):
            read()
    write(f"{tmp_path}/image.png", data)
    with pytest.raises(sources.DataError, match="image.png"):
        sources.read_image(f"{tmp_path}/image.png")


def test_kinds_cover_the_real_encodings():
    """The fixtures are what the datasets ship: GTA5 'P' and 'L', 16-bit grey, SYNTHIA 16-bit
    RGB, Cityscapes 8-bit grey, RGB images (so the fuzzing above fuzzes those)."""
    modes = {k: Image.open(io.BytesIO(v[0])).mode for k, v in LABELS.items()}
    assert modes["gta5_palette"] == "P" and modes["gta5_grey"] == "L"
    assert modes["grey16"].startswith("I;16") and modes["cityscapes_labelIds"] == "L"
    head = LABELS["synthia16_rgb"][0][24:26]
    assert head == bytes([16, 2])  # bit depth 16, colour type RGB
    assert Image.open(io.BytesIO(IMAGE_PNG)).mode == "RGB"
    assert len(set(PALETTE[0::3][:40])) > 1 and PALETTE[:3] != PALETTE[3:6]
    assert os.path.basename(LABEL_NAMES["cityscapes_labelIds"]).endswith("_gtFine_labelIds.png")
