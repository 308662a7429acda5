"""Real datasets as they are on disk: the odd files that must not stop a run (CPU).

A GTA5 image whose size differs from its label's (real GTA5 has a few), 8-bit SYNTHIA labels,
16-bit greyscale labels (raw and scaled ids), a label cut inside its PNG header, and a
predict-mode input that matches nothing.
"""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from metapix_jax.data import labels, pipeline, png, prepare, sources, transforms

CS = labels.CITYSCAPES_ID_TO_TRAIN_ID
SYN = labels.SYNTHIA_ID_TO_TRAIN_ID
SHAPE = (6, 10)
ODD = (9, 13)  # the odd image's size (height, width)
SIZE = (8, 16)  # training size
RNG = np.random.default_rng(15)


def _png(path: str, array: np.ndarray, palette: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(array)
    if palette:
        im.putpalette([v for i in range(256) for v in (i, (7 * i) % 256, 255 - i)])
    im.save(path)
    return path


def _png16(path: str, array: np.ndarray) -> str:
    """16-bit RGB (HxWx3) or greyscale (HxW) PNG written by hand (Pillow cannot write 16-bit
    colour)."""
    height, width = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png.PNG_SIGNATURE + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _gta5_with_an_odd_pair(root: str, n: int = 5, odd: int = 2) -> list[np.ndarray]:
    """GTA5 layout; pair `odd` has an image of another size than its label. Each label holds
    one class (train id i), so rows of a batch tell which example they are."""
    images = []
    for i in range(n):
        shape = ODD if i == odd else SHAPE
        images.append(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
        _png(f"{root}/images/{i + 1:05d}.png", images[-1])
        ids = np.full(SHAPE, labels.TRAIN_ID_TO_CITYSCAPES_ID[i], np.uint8)
        ids[0, 0] = 0  # one ignored pixel, at the left: tells a flipped row
        _png(f"{root}/labels/{i + 1:05d}.png", ids, palette=True)
    return images


def _which(label: np.ndarray) -> tuple[int, bool]:
    """(example index, flipped) of a batch row of `_gta5_with_an_odd_pair`."""
    flipped = label[0, -1] == 255
    return int(label[0, 0] if flipped else label[0, -1]), bool(flipped)


def test_a_pair_of_different_sizes_passes_through_a_long_shuffled_stream(tmp_path, caplog):
    images = _gta5_with_an_odd_pair(f"{tmp_path}/gta")
    pairs = sources.gta5_pairs(f"{tmp_path}/gta")
    examples = sources.PngExamples(tuple(pairs), CS)
    kw = dict(batch_size=2, size=SIZE, seed=7, flip=True, normalization="caffe", num_threads=2)
    stream = pipeline.train_batches(examples, **kw)
    seen = []
    for _ in range(40):  # 80 positions: 16 epochs of 5 examples
        batch = next(stream)
        assert batch["image"].shape == (2, *SIZE, 3) and batch["label"].shape == (2, *SIZE)
        for x, y in zip(batch["image"], batch["label"], strict=True):
            index, flipped = _which(y)
            seen.append(index)
            if index == 2:  # each resized on its own: image bicubic, label nearest
                image = transforms.resize_image(images[2], SIZE)
                label = transforms.resize_label(examples.read(2)[1], SIZE)
                if flipped:
                    image, label = image[:, ::-1], label[:, ::-1]
                expected_x, _ = transforms.preprocess(image, label, None, False, "caffe")
                np.testing.assert_array_equal(x, expected_x)
                np.testing.assert_array_equal(y, label)
    assert seen.count(2) == 16 and sorted(set(seen)) == [0, 1, 2, 3, 4]
    warnings = [r for r in caplog.records if "resized to the training size separately" in r.msg]
    assert len(warnings) == 1  # once per file, not once per epoch
    message = warnings[0].getMessage()
    assert "00003.png' is 13x9 but its label" in message and "is 10x6 (width x height)" in message
    # Prepared records: the same pair, resized the same way; the streams are identical.
    prepare.write_prepared(examples, f"{tmp_path}/prep", SIZE, num_threads=2)
    prepared = pipeline.train_batches(prepare.PreparedExamples(f"{tmp_path}/prep", SIZE), **kw)
    again = pipeline.train_batches(examples, **kw)
    for _ in range(10):
        a, b = next(prepared), next(again)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_a_pair_of_different_sizes_in_evaluation(tmp_path):
    """'full': the image goes to the network size, the label keeps its own; 'resized': both
    go to the network size."""
    images = _gta5_with_an_odd_pair(f"{tmp_path}/gta")
    pairs = sources.gta5_pairs(f"{tmp_path}/gta")
    kw = dict(batch_size=5, size=SIZE, normalization="imagenet", num_threads=1)
    full = next(pipeline.eval_batches(pairs, CS, protocol="full", **kw))
    resized = next(pipeline.eval_batches(pairs, CS, protocol="resized", **kw))
    label = sources.read_example(*pairs[2], CS)[1]
    np.testing.assert_array_equal(full["label"][2], label)
    np.testing.assert_array_equal(resized["label"][2], transforms.resize_label(label, SIZE))
    expected, _ = transforms.preprocess(images[2], label, SIZE, False, "imagenet")
    np.testing.assert_array_equal(full["image"][2], expected)
    np.testing.assert_array_equal(resized["image"][2], expected)
    assert full["image"].shape == (5, *SIZE, 3) and full["label"].shape == (5, *SHAPE)


def test_the_configured_source_stream_passes_through_a_pair_of_different_sizes(tmp_path):
    """A real-layout GTA5 source with an odd pair, read as training reads it (config ->
    `datasets.get_datasets` -> its source stream) for several epochs. (tests/test_faults.py
    trains the model through such a pair.)"""
    from configs import test as test_config
    from metapix_jax.data import datasets

    _gta5_with_an_odd_pair(f"{tmp_path}/gta", n=3, odd=1)
    for split, stem in [("train", "bonn_000000_000019"), ("val", "ulm_000000_000019")]:
        city = stem.split("_")[0]
        image = RNG.integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
        ids = RNG.choice(labels.TRAIN_ID_TO_CITYSCAPES_ID, SHAPE).astype(np.uint8)
        _png(f"{tmp_path}/cs/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", image)
        _png(f"{tmp_path}/cs/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", ids)
    config = test_config.get_config()
    d = config.data
    d.synthetic, d.source_kind = False, "gta5"
    d.source_root, d.target_root = f"{tmp_path}/gta", f"{tmp_path}/cs"
    data = datasets.get_datasets(config, str(tmp_path), with_source=True)
    stream = data.stream(data.source, "source", 0)
    seen = [_which(y)[0] for _ in range(9) for y in next(stream)["label"]]  # 6 epochs
    assert seen.count(1) == 6
    batch = next(data.eval_batches())
    assert batch["image"].shape[1:3] == (d.height, d.width)


@pytest.mark.parametrize("channels", ["rgb", "grey", "palette"])
def test_8bit_synthia_labels_decode_from_the_first_channel(tmp_path, channels):
    """SYNTHIA's ids (0..22) fit in 8 bits: an 8-bit label holds the class in its first (or
    only) channel, like the 16-bit original. This used to be an OverflowError."""
    ids = np.array([[3, 4, 2, 21, 5, 7, 15, 9, 6, 16], [1, 10, 17, 8, 18, 19, 20, 12, 11, 0]])
    ids = np.tile(ids, (3, 1)).astype(np.uint8)
    image = _png(f"{tmp_path}/RGB/0000000.png", RNG.integers(0, 256, (*SHAPE, 3), np.uint8))
    path = f"{tmp_path}/GT/LABELS/0000000.png"
    if channels == "rgb":
        _png(path, np.stack([ids, ids * 0 + 200, ids * 0 + 3], -1))  # instance ids after it
    else:
        _png(path, ids, palette=channels == "palette")
    original = _png16(f"{tmp_path}/16bit.png", np.stack([ids, ids * 0 + 200, ids * 0], -1))
    expected = sources.read_example(image, original, SYN)[1]
    assert sorted(np.unique(expected).tolist()) == list(range(19)) + [255]
    np.testing.assert_array_equal(sources.read_example(image, path, SYN)[1], expected)


def test_16bit_greyscale_labels_raw_and_scaled(tmp_path, caplog):
    """Raw ids in a 16-bit greyscale label decode like the 8-bit label (an id above 255 is
    unknown, not wrapped); scaled values (id * 257) give no valid id and a warning naming
    the file, once."""
    ids = np.tile(np.array([7, 8, 26, 33, 0, 5, 24, 263, 256 + 26, 11], np.uint16), (6, 1))
    image = _png(f"{tmp_path}/image.png", RNG.integers(0, 256, (*SHAPE, 3), np.uint8))
    raw = _png16(f"{tmp_path}/raw.png", ids)
    decoded = sources.read_example(image, raw, CS)[1]
    assert decoded[0].tolist() == [0, 1, 13, 18, 255, 255, 11, 255, 255, 2]
    assert "no valid class id" not in caplog.text
    scaled = _png16(f"{tmp_path}/scaled.png", ids % 256 * 257)
    for _ in range(3):
        assert (sources.read_example(image, scaled, CS)[1] == 255).all()
    assert caplog.text.count("no valid class id") == 1 and "scaled.png" in caplog.text


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 16, 25, 26, 32, 33, 40])
def test_a_label_cut_inside_its_header_is_a_data_error(tmp_path, length):
    image = _png(f"{tmp_path}/image.png", RNG.integers(0, 256, (*SHAPE, 3), np.uint8))
    full = _png16(f"{tmp_path}/whole.png", np.zeros((*SHAPE, 3), np.uint16))
    with open(full, "rb") as f:
        data = f.read()
    label = f"{tmp_path}/label.png"
    with open(label, "wb") as f:
        f.write(data[:length])
    for table in (SYN, CS):
        with pytest.raises(sources.DataError, match=f"cannot read '{label}'"):
            sources.read_example(image, label, table)


def test_every_bad_file_is_skipped_with_skip_bad_files(tmp_path, caplog):
    """Files that used to raise other exceptions (8-bit SYNTHIA label: decodes now; cut
    header, colour label: DataError) never stop a stream with skip_bad."""
    _gta5_with_an_odd_pair(f"{tmp_path}/gta", n=4, odd=0)
    pairs = sources.gta5_pairs(f"{tmp_path}/gta")
    with open(pairs[1][1], "wb") as f:
        f.write(png.PNG_SIGNATURE + b"\x00\x00")  # cut inside the header
    _png(pairs[2][1], RNG.integers(0, 256, (*SHAPE, 3), np.uint8))  # colour-coded label
    kw = dict(batch_size=2, size=SIZE, seed=1, flip=False, normalization="caffe", num_threads=1)
    with pytest.raises(sources.DataError):
        for _ in range(4):
            next(pipeline.train_batches(pairs, CS, **kw))
    stream = pipeline.train_batches(pairs, CS, skip_bad=True, **kw)
    seen = {_which(y)[0] for _ in range(8) for y in next(stream)["label"]}
    assert seen == {0, 3}
    assert "skipping bad file" in caplog.text and "00002.png" in caplog.text


def test_predict_input_matching_nothing_is_a_data_error(tmp_path):
    from metapix_jax import predict

    with pytest.raises(sources.DataError, match="predict.input=.*matched no images"):
        predict.find_images(str(tmp_path / "*.png"))
