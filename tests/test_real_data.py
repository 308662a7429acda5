"""Real dataset layouts and encodings, list files, prepared records, TFDS and bad data (CPU)."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from metapix_jax.data import labels, pipeline, prepare, sources

RGB = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
# Cityscapes/GTA5 ids with their expected train ids (REFERENCE section 6; 0, 5, 255 ignored).
CS_IDS = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
                   0, 5, 255] * 3, np.uint8)[:60].reshape(6, 10)  # fmt: skip
CS_REF = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
          25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
SYN_REF = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
           17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}  # fmt: skip
# SYNTHIA ids incl. unknown ones (0, 13, 22) and one above 255 (300: must not wrap to 44).
SYN_IDS = np.array(list(SYN_REF) + [0, 13, 22, 300] + [44] * 37, np.uint16).reshape(6, 10)


def _expected(ids: np.ndarray, ref: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda v: ref.get(int(v), 255))(ids).astype(np.uint8)


def _png(path: str, array: np.ndarray, palette: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(array)
    if palette:  # GTA5 labels are 8-bit palette PNGs: the indices are the ids.
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    im.save(path)
    return path


def _png16_rgb(path: str, array: np.ndarray) -> str:
    """A 16-bit RGB PNG written by hand (PIL cannot), as SYNTHIA's GT/LABELS files are."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _synthia(root: str, n: int = 3) -> None:
    for i in range(n):
        _png(f"{root}/RGB/{i:07d}.png", np.roll(RGB, i, axis=1))
        ids = np.zeros((6, 10, 3), np.uint16)
        ids[..., 0] = np.roll(SYN_IDS, i, axis=1)
        ids[..., 1] = 1000 + i  # instance ids: must be ignored
        _png16_rgb(f"{root}/GT/LABELS/{i:07d}.png", ids)


def _gta5(root: str, n: int = 3) -> None:
    for i in range(n):
        _png(f"{root}/images/{i + 1:05d}.png", np.roll(RGB, i, axis=1))
        _png(f"{root}/labels/{i + 1:05d}.png", np.roll(CS_IDS, i, axis=1), palette=True)


def _cityscapes(root: str, split: str, stems: list[str]) -> None:
    for i, stem in enumerate(stems):
        city = stem.split("_")[0]
        _png(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", np.roll(RGB, i, 1))
        _png(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", np.roll(CS_IDS, i, 1))


def test_each_layout_loads_the_right_train_ids(tmp_path) -> None:
    _synthia(f"{tmp_path}/syn")
    pairs = sources.source_pairs("synthia", f"{tmp_path}/syn")
    assert [os.path.basename(p[0]) for p in pairs] == ["0000000.png", "0000001.png", "0000002.png"]
    examples = sources.PngExamples(tuple(pairs), sources.id_to_train_id("synthia"))
    for i in range(3):
        image, label = examples.read(i)
        np.testing.assert_array_equal(image, np.roll(RGB, i, axis=1))
        np.testing.assert_array_equal(label, _expected(np.roll(SYN_IDS, i, axis=1), SYN_REF))
    _gta5(f"{tmp_path}/gta")
    examples = sources.PngExamples(
        tuple(sources.source_pairs("gta5", f"{tmp_path}/gta")), sources.id_to_train_id("gta5")
    )
    np.testing.assert_array_equal(examples.read(1)[1], _expected(np.roll(CS_IDS, 1, 1), CS_REF))
    _cityscapes(f"{tmp_path}/cs", "val", ["bonn_000000_000019", "aachen_000001_000019"])
    pairs = sources.cityscapes_pairs(f"{tmp_path}/cs", "val")
    assert "aachen" in pairs[0][0]  # sorted by city
    _, label = sources.read_example(*pairs[0], labels.CITYSCAPES_ID_TO_TRAIN_ID)
    np.testing.assert_array_equal(label, _expected(np.roll(CS_IDS, 1, 1), CS_REF))
    with pytest.raises(ValueError, match="source_kind.*gta5.*synthia"):
        sources.source_pairs("synthiaa", f"{tmp_path}/syn")


def test_synthia_layout_errors(tmp_path) -> None:
    with pytest.raises(sources.DataError, match="does not exist.*SYNTHIA"):
        sources.synthia_pairs(f"{tmp_path}/none")
    os.makedirs(f"{tmp_path}/syn/RGB")
    with pytest.raises(sources.DataError, match="LABELS.*SYNTHIA.*found: RGB"):
        sources.synthia_pairs(f"{tmp_path}/syn")
    _png(f"{tmp_path}/syn/RGB/0000000.png", RGB)
    os.makedirs(f"{tmp_path}/syn/GT/LABELS")
    with pytest.raises(sources.DataError, match="0000000.png"):
        sources.synthia_pairs(f"{tmp_path}/syn")
    lut = labels.SYNTHIA_ID_TO_TRAIN_ID
    label = _png16_rgb(f"{tmp_path}/syn/GT/LABELS/0000000.png", np.zeros((6, 10, 3), np.uint16))
    data = open(label, "rb").read()
    with open(label, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(sources.DataError, match="LABELS/0000000.png"):
        sources.read_example(f"{tmp_path}/syn/RGB/0000000.png", label, lut)


def test_list_files_restrict_and_order(tmp_path) -> None:
    _gta5(f"{tmp_path}/gta")
    pairs = sources.gta5_pairs(f"{tmp_path}/gta")
    with open(f"{tmp_path}/list.txt", "w") as f:
        f.write("# comment\n00003.png\n\nimages/00001.png\n")
    chosen = sources.restrict_to_list(pairs, f"{tmp_path}/gta", f"{tmp_path}/list.txt")
    assert [os.path.basename(p[0]) for p in chosen] == ["00003.png", "00001.png"]
    assert sources.restrict_to_list(pairs, f"{tmp_path}/gta", "") == pairs
    with open(f"{tmp_path}/bad.txt", "w") as f:
        f.write("00001.png\n00009.png\n")
    with pytest.raises(sources.DataError, match=r"bad.txt:2: '00009.png'"):
        sources.restrict_to_list(pairs, f"{tmp_path}/gta", f"{tmp_path}/bad.txt")
    _cityscapes(f"{tmp_path}/cs", "train", ["bonn_000000_000019", "aachen_000001_000019"])
    with open(f"{tmp_path}/cs.txt", "w") as f:
        f.write("bonn/bonn_000000_000019_leftImg8bit.png\n")
    pairs = sources.cityscapes_pairs(f"{tmp_path}/cs", "train")
    chosen = sources.restrict_to_list(pairs, f"{tmp_path}/cs", f"{tmp_path}/cs.txt")
    assert len(chosen) == 1 and "bonn_000000" in chosen[0][0]


def _batches(examples, steps: int, **kw) -> list[dict]:
    args = dict(batch_size=2, size=(4, 8), seed=5, flip=True, normalization="caffe")
    it = pipeline.train_batches(examples, **{**args, **kw})
    return [next(it) for _ in range(steps)]


def test_prepared_records_give_the_same_batches_as_pngs(tmp_path) -> None:
    _synthia(f"{tmp_path}/syn", n=5)
    pairs = sources.synthia_pairs(f"{tmp_path}/syn")
    pngs = sources.PngExamples(tuple(pairs), labels.SYNTHIA_ID_TO_TRAIN_ID)
    assert prepare.write_prepared(pngs, f"{tmp_path}/prep", (4, 8), num_threads=2) == 5
    prepared = prepare.PreparedExamples(f"{tmp_path}/prep", (4, 8))
    assert prepared.name(3) == pairs[3][0]
    for a, b in zip(_batches(pngs, 6), _batches(prepared, 6), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    single = _batches(prepared, 3, batch_size=1, start_step=2)  # the paper's batch of 1
    np.testing.assert_array_equal(single[2]["label"][0], _batches(pngs, 3)[2]["label"][0])
    resumed = _batches(prepared, 2, start_step=4)
    np.testing.assert_array_equal(resumed[1]["label"], _batches(pngs, 6)[5]["label"])
    with pytest.raises(sources.DataError, match="meta.json.*8x4.*16x8"):
        prepare.PreparedExamples(f"{tmp_path}/prep", (8, 16))
    with pytest.raises(sources.DataError, match="meta.json.*data.source_prepared"):
        prepare.PreparedExamples(f"{tmp_path}/nothing")


def test_worker_processes_give_the_same_stream(tmp_path) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (main.py parses them).
    _gta5(f"{tmp_path}/gta", n=4)
    examples = sources.PngExamples(
        tuple(sources.gta5_pairs(f"{tmp_path}/gta")), labels.CITYSCAPES_ID_TO_TRAIN_ID
    )
    threads = _batches(examples, 5)
    workers = _batches(examples, 5, num_workers=2)
    for a, b in zip(threads, workers, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_unknown_ids_map_to_ignore_and_bad_files_are_replaced(tmp_path, caplog) -> None:
    _gta5(f"{tmp_path}/gta", n=4)
    unknown = np.array([[0, 1, 2, 3, 4, 34, 200, 255, 7, 26]] * 6, np.uint8)
    _png(f"{tmp_path}/gta/labels/00001.png", unknown)
    pairs = sources.gta5_pairs(f"{tmp_path}/gta")
    examples = sources.PngExamples(tuple(pairs), labels.CITYSCAPES_ID_TO_TRAIN_ID)
    assert examples.read(0)[1][0].tolist() == [255] * 8 + [0, 13]
    with open(pairs[1][0], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(sources.DataError, match="00002.png"):
        _batches(examples, 4)
    before = pipeline.bad_file_count()
    skipped = _batches(examples, 4, skip_bad=True, flip=False, size=None)
    # 2 epochs of 4 examples were consumed, one bad each; read-ahead may have replaced more.
    assert pipeline.bad_file_count() - before >= 2
    assert "00002.png" in caplog.text and "00003.png" in caplog.text
    # Deterministic: the bad example became its successor (example 2) at the same positions.
    again = _batches(examples, 4, skip_bad=True, flip=False, size=None)
    for a, b in zip(skipped, again, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
    rows = [label for batch in skipped for label in batch["label"]]
    third = examples.read(2)[1]
    assert sum(np.array_equal(r, third) for r in rows) == 4  # example 2 twice per epoch


def test_tfds_cityscapes_source_maps_label_ids() -> None:
    import tensorflow_datasets as tfds  # pinned in requirements.txt

    from metapix_jax.data import tfds_source

    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source(tfds_source.TFDS_NAME, split="validation", download=False)
        examples = tfds_source.TfdsExamples("val")
        assert len(examples) == 2 and "validation" in examples.name(1)
        image, label = examples.read(1)
        ids = raw[1]["segmentation_label"][..., 0]
        np.testing.assert_array_equal(image, raw[1]["image_left"])
        np.testing.assert_array_equal(label, _expected(ids, CS_REF))
        batch = next(
            pipeline.eval_batches(
                examples, batch_size=2, size=(8, 16), normalization="imagenet", protocol="full"
            )
        )
        assert batch["image"].shape == (2, 8, 16, 3) and batch["label"].shape == (2, 1024, 2048)


def test_load_data_and_streams_follow_the_config(tmp_path) -> None:
    from configs import test as test_config
    from metapix_jax.data import datasets

    _synthia(f"{tmp_path}/syn", n=3)
    _cityscapes(f"{tmp_path}/cs", "train", ["bonn_000000_000019", "aachen_000001_000019"])
    _cityscapes(f"{tmp_path}/cs", "val", ["bonn_000002_000019"])
    config = test_config.get_config()
    d = config.data
    d.synthetic, d.source_kind = False, "synthia"
    d.source_root, d.target_root = f"{tmp_path}/syn", f"{tmp_path}/cs"
    d.height, d.width, d.source_batch = 6, 10, 1
    with open(f"{tmp_path}/val.txt", "w") as f:
        f.write("bonn/bonn_000002_000019_leftImg8bit.png\n")
    d.target_eval_list = f"{tmp_path}/val.txt"
    data = datasets.get_datasets(config, str(tmp_path), with_source=True)
    assert len(data.source) == 3 and len(data.target_train) == 2 and len(data.target_eval) == 1
    labels_seen = next(data.stream(data.source, "source", 0))["label"][0]
    expected = [_expected(np.roll(SYN_IDS, i, axis=1), SYN_REF) for i in range(3)]
    assert any(np.array_equal(labels_seen, e) for e in expected)  # read with the SYNTHIA table
    prepare.write_prepared(data.source, f"{tmp_path}/prep", (6, 10))
    d.source_prepared = f"{tmp_path}/prep"
    prepared = datasets.get_datasets(config, str(tmp_path), with_source=True)
    assert isinstance(prepared.source, prepare.PreparedExamples)
    first = next(prepared.stream(prepared.source, "source", 0))["label"][0]
    np.testing.assert_array_equal(first, labels_seen)
    assert datasets.get_datasets(config, str(tmp_path), with_source=False).source is None
