"""Data package tests: label tables, layouts, pipelines, synthetic benchmark (CPU, no jax)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from metapix_jax.data import labels, normalization, pipeline, sources, synthetic, transforms

REF_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
           25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
REF_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
               17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}  # fmt: skip


def test_label_tables_match_reference() -> None:
    for table, ref in [
        (labels.CITYSCAPES_ID_TO_TRAIN_ID, REF_IDS),
        (labels.SYNTHIA_ID_TO_TRAIN_ID, REF_SYNTHIA),
    ]:
        expected = np.full(len(table), 255)
        expected[list(ref)] = list(ref.values())
        np.testing.assert_array_equal(table, expected)
    assert labels.CLASS_NAMES[0] == "road" and labels.CLASS_NAMES[18] == "bicycle"
    assert labels.TRAIN_ID_TO_CITYSCAPES_ID.tolist() == list(REF_IDS)
    assert labels.PALETTE.shape == (19, 3) and labels.PALETTE[0].tolist() == [128, 64, 128]
    col = labels.colorize(np.array([[0, 255]]))
    assert col[0, 0].tolist() == [128, 64, 128] and col[0, 1].tolist() == [0, 0, 0]


def _png(path: str, array: np.ndarray, palette: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(array)
    if palette:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    im.save(path)


IDS = np.array([[7, 8, 26, 33], [0, 5, 255, 24]], np.uint8)  # 0, 5, 255 are not train classes
TRAIN = np.array([[0, 1, 13, 18], [255, 255, 255, 11]], np.uint8)


def test_gta5_and_cityscapes_labels_load(tmp_path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 3), dtype=np.uint8)
    _png(f"{tmp_path}/gta/images/00002.png", rgb)
    _png(f"{tmp_path}/gta/labels/00002.png", IDS, palette=True)  # GTA5 ships 'P' PNGs
    _png(f"{tmp_path}/gta/images/00001.png", rgb)
    _png(f"{tmp_path}/gta/labels/00001.png", IDS)
    pairs = sources.gta5_pairs(f"{tmp_path}/gta")
    assert [os.path.basename(p[0]) for p in pairs] == ["00001.png", "00002.png"]
    for image_path, label_path in pairs:
        image, label = sources.read_example(
            image_path, label_path, labels.CITYSCAPES_ID_TO_TRAIN_ID
        )
        np.testing.assert_array_equal(image, rgb)
        np.testing.assert_array_equal(label, TRAIN)
    for city, stem in [("b", "b_000000_000001"), ("a", "a_000001_000002")]:
        _png(f"{tmp_path}/cs/leftImg8bit/val/{city}/{stem}_leftImg8bit.png", rgb)
        _png(f"{tmp_path}/cs/gtFine/val/{city}/{stem}_gtFine_labelIds.png", IDS)
    pairs = sources.cityscapes_pairs(f"{tmp_path}/cs", "val")
    assert [p[0].split(os.sep)[-2] for p in pairs] == ["a", "b"]
    _, label = sources.read_example(*pairs[0], labels.CITYSCAPES_ID_TO_TRAIN_ID)
    np.testing.assert_array_equal(label, TRAIN)


def test_layout_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.gta5_pairs(f"{tmp_path}/nothing")
    os.makedirs(f"{tmp_path}/gta/images")
    with pytest.raises(sources.DataError, match="labels.*found: images"):
        sources.gta5_pairs(f"{tmp_path}/gta")
    _png(f"{tmp_path}/gta/images/00001.png", np.zeros((2, 4, 3), np.uint8))
    os.makedirs(f"{tmp_path}/gta/labels")
    with pytest.raises(sources.DataError, match="00001.png"):
        sources.gta5_pairs(f"{tmp_path}/gta")
    os.makedirs(f"{tmp_path}/cs/leftImg8bit/train/x")
    os.makedirs(f"{tmp_path}/cs/gtFine/train/x")
    with pytest.raises(sources.DataError, match="empty"):
        sources.cityscapes_pairs(f"{tmp_path}/cs", "train")
    with pytest.raises(sources.DataError, match="val"):
        sources.cityscapes_pairs(f"{tmp_path}/cs", "val")


def test_corrupt_and_mismatched_files(tmp_path, caplog) -> None:
    lut = labels.CITYSCAPES_ID_TO_TRAIN_ID
    img, lab = f"{tmp_path}/img.png", f"{tmp_path}/lab.png"
    _png(img, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _png(lab, np.full((32, 31), 7, np.uint8))
    # A pair of different sizes is read as it is (each is resized on its own later), warned.
    image, label = sources.read_example(img, lab, lut)
    assert image.shape == (32, 32, 3) and label.shape == (32, 31)
    assert "img.png' is 32x32 but its label" in caplog.text and "lab.png' is 31x32" in caplog.text
    _png(lab, np.zeros((32, 32), np.uint8))
    data = open(img, "rb").read()
    with open(img, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(sources.DataError, match="img.png"):
        sources.read_example(img, lab, lut)
    with open(img, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(sources.DataError, match="img.png"):
        sources.read_example(img, lab, lut)


def _tagged_pairs(tmp_path, n: int) -> list[tuple[str, str]]:
    """Images whose label encodes their index in the left half and 255 in the right half."""
    pairs = []
    for i in range(n):
        label = np.full((4, 8), 255, np.uint8)
        label[:, :4] = labels.TRAIN_ID_TO_CITYSCAPES_ID[i]
        pairs.append((f"{tmp_path}/i{i}.png", f"{tmp_path}/l{i}.png"))
        _png(pairs[-1][0], np.full((4, 8, 3), 10 * i, np.uint8))
        _png(pairs[-1][1], label)
    return pairs


def _decode(batch: dict) -> list[tuple[int, bool]]:
    """(image index, flipped) of each row of a batch of tagged images."""
    out = []
    for label in batch["label"]:
        flipped = label[0, 0] == 255
        out.append((int(label[0, -1] if flipped else label[0, 0]), bool(flipped)))
    return out


def _stream(pairs, steps: int, **kw) -> list[list[tuple[int, bool]]]:
    args = dict(batch_size=4, size=None, seed=3, flip=True, normalization="caffe", num_threads=2)
    it = pipeline.train_batches(pairs, labels.CITYSCAPES_ID_TO_TRAIN_ID, **{**args, **kw})
    out = []
    for _ in range(steps):
        batch = next(it)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        out.append(_decode(batch))
    return out


def test_train_stream_determinism_resume_epochs_flips(tmp_path) -> None:
    pairs = _tagged_pairs(tmp_path, 8)
    full = _stream(pairs, 12)
    assert full == _stream(pairs, 12)
    assert full != _stream(pairs, 12, seed=4)
    assert _stream(pairs, 5, start_step=7) == full[7:]
    epochs = [sorted(i for b in full[2 * e : 2 * e + 2] for i, _ in b) for e in range(6)]
    assert all(ep == list(range(8)) for ep in epochs)  # every epoch is a permutation
    orders = {tuple(i for b in full[2 * e : 2 * e + 2] for i, _ in b) for e in range(6)}
    assert len(orders) > 1  # reshuffled between epochs
    flips = [f for b in full for _, f in b]
    assert 0.3 < np.mean(flips) < 0.7
    assert not any(f for b in _stream(pairs, 6, flip=False) for _, f in b)
    # Two shards together read exactly each global batch.
    shards = [_stream(pairs, 6, batch_size=4, shard_index=s, shard_count=2) for s in (0, 1)]
    for k in range(6):
        assert sorted(shards[0][k] + shards[1][k]) == sorted(full[k])


def test_preprocess_resize_and_normalization() -> None:
    image = np.full((4, 6, 3), [255, 0, 0], np.uint8)
    label = np.arange(24, dtype=np.uint8).reshape(4, 6)
    x, y = transforms.preprocess(image, label, (8, 12), False, "caffe")
    assert x.shape == (8, 12, 3) and y.shape == (8, 12) and set(np.unique(y)) <= set(range(24))
    np.testing.assert_allclose(
        x[0, 0], [-104.00698793, -116.66876762, 255 - 122.67891434], atol=1e-3
    )
    x, _ = transforms.preprocess(image, label, None, True, "imagenet")
    np.testing.assert_allclose(
        x[0, 0],
        (np.array([1.0, 0, 0]) - normalization.IMAGENET_MEAN) / normalization.IMAGENET_STD,
        rtol=1e-5,
    )


def test_eval_batches_pad_with_ignore(tmp_path) -> None:
    pairs = _tagged_pairs(tmp_path, 5)
    batches = list(
        pipeline.eval_batches(
            pairs,
            labels.CITYSCAPES_ID_TO_TRAIN_ID,
            batch_size=2,
            size=(8, 16),
            normalization="imagenet",
        )
    )
    assert [b["image"].shape for b in batches] == [(2, 8, 16, 3)] * 3
    assert [i for b in batches[:2] for i, _ in _decode(b)] == [0, 1, 2, 3]
    assert (batches[2]["label"][1] == 255).all() and (batches[2]["image"][1] == 0).all()


BENCH = dict(height=32, width=64, num_source=24, num_target_train=3, num_target_val=4, workers=1)


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            if name.endswith(".png"):
                out[os.path.relpath(os.path.join(d, name), root)] = open(
                    os.path.join(d, name), "rb"
                ).read()
    return out


def test_benchmark_deterministic_idempotent_and_loadable(tmp_path) -> None:
    a, b, c = (f"{tmp_path}/{n}" for n in "abc")
    synthetic.write_benchmark(a, seed=1, **BENCH)
    synthetic.write_benchmark(b, seed=1, **{**BENCH, "workers": 2})
    synthetic.write_benchmark(c, seed=2, **BENCH)
    fa = _files(a)
    assert len(fa) == 24 * 3 + 7 * 2 and fa == _files(b) and fa != _files(c)
    stamp = os.path.getmtime(f"{a}/benchmark.json")
    synthetic.write_benchmark(a, seed=1, **BENCH)  # same parameters: nothing rewritten
    assert os.path.getmtime(f"{a}/benchmark.json") == stamp
    synthetic.write_benchmark(a, seed=1, **{**BENCH, "num_source": 10})  # regenerated
    assert len(sources.gta5_pairs(f"{a}/gta5")) == 10
    assert json.load(open(f"{a}/benchmark.json"))["params"]["num_source"] == 10
    os.remove(f"{a}/benchmark.json")  # as after an interrupted run: regenerated
    synthetic.write_benchmark(a, seed=1, **BENCH)
    assert _files(a) == fa

    lut = labels.CITYSCAPES_ID_TO_TRAIN_ID
    seen = set()
    for split in ("train", "val"):
        for pair in sources.cityscapes_pairs(f"{a}/cityscapes", split):
            image, label = sources.read_example(*pair, lut)
            assert image.shape == (32, 64, 3) and label.shape == (32, 64)
            seen |= set(np.unique(label).tolist())
    assert {0, 1, 2, 8, 10} <= seen
    harmful = 0
    for i, pair in enumerate(sources.gta5_pairs(f"{a}/gta5")):
        image, label = sources.read_example(*pair, lut)
        mask = sources.read_mask(pair[0].replace("images", "harmful"))
        _, classes, _, _ = synthetic.render_example(1, "source", i, 32, 64, 1.0)  # the truth
        np.testing.assert_array_equal(mask, label != classes)
        np.testing.assert_array_equal(label[~mask], classes[~mask])
        harmful += mask.sum()
    assert harmful > 0


def test_harm_and_gap_parameters() -> None:
    rng = np.random.default_rng(0)
    classes, instances = synthetic.render_scene(rng, 64, 128)
    assert classes.shape == (64, 128) and instances.shape == (64, 128)
    confusions = {"sidewalk": "road"}
    none = synthetic.corrupt_labels(classes, instances, rng, confusions, 0.0)
    every = synthetic.corrupt_labels(classes, instances, rng, confusions, 1.0)
    np.testing.assert_array_equal(none, classes)
    np.testing.assert_array_equal(every, np.where(classes == 1, 0, classes))
    same = [
        synthetic.render_image(classes, instances, np.random.default_rng(5), d, 0.0)
        for d in ("real", "synthetic")
    ]
    np.testing.assert_array_equal(same[0], same[1])  # gap 0: one distribution
    with pytest.raises(ValueError):
        synthetic.corrupt_labels(classes, instances, rng, {"sidewalk": "nope"}, 0.5)


def test_all_classes_occur() -> None:
    seen = np.zeros(256, bool)
    for i in range(300):
        classes, _ = synthetic.render_scene(np.random.default_rng(i), 64, 128)
        seen[np.unique(classes)] = True
    assert seen[: labels.NUM_CLASSES].all()


def test_random_relabeling_and_confusion_parsing() -> None:
    rng = np.random.default_rng(0)
    classes, instances = synthetic.render_scene(rng, 64, 128)
    every = synthetic.corrupt_labels(classes, instances, rng, {"*": "*"}, 1.0)
    labeled = classes != 255
    # Every labeled pixel gets another class, the same one across its whole instance.
    assert np.all(every[labeled] != classes[labeled]) and np.all(every[labeled] < 19)
    assert np.all(every[~labeled] == 255)
    for i in np.unique(instances[labeled]):
        assert len(np.unique(every[instances == i])) == 1
    only_cars = synthetic.corrupt_labels(classes, instances, rng, {"car": "*"}, 1.0)
    changed = only_cars != classes
    assert np.all(classes[changed] == 13)
    assert synthetic.parse_confusions("sidewalk>road, car>*") == {"sidewalk": "road", "car": "*"}
    assert synthetic.parse_confusions("") == {}
    with pytest.raises(ValueError, match="confusions"):
        synthetic.parse_confusions("sidewalk-road")
