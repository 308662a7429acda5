"""The benchmark's kinds of harm: each mask is exactly what its kind changed (CPU, no jax).

A method is judged on how it treats the harmful pixels, so the mask written to gta5/harmful/
must be exact for every kind, the target must never move, and the default kind must stay the
bytes the published demo results were measured on.
"""

import hashlib
import inspect
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import default
from metapix_jax.data import labels, sources, synthetic

SEED, H, W = 7, 32, 64
TINY = dict(height=H, width=W, num_source=12, num_target_train=3, num_target_val=3)
LUT = labels.CITYSCAPES_ID_TO_TRAIN_ID

# Digests of the decoded PNGs (mode, size, palette, pixels; independent of the zlib build) of
# `write_benchmark(root, seed=7, **TINY)`, computed with main's generator at commit a05b106,
# before the kinds of harm existed. The default kind must keep reproducing them.
MAIN_GTA5 = "eafad54e049f9e4de8b3c161721aa867a849274a9f0efb092ed89844b0acc9c8"
MAIN_CITYSCAPES = "3da03c978200fda28e91622526d7fdd2e0f39e77ed65af3767f27f1ebb9e6403"
# benchmark.json "params" as main wrote them: equal params reuse a benchmark on disk.
MAIN_PARAMS = {
    "generator_version": 1,
    "seed": 7,
    "height": 32,
    "width": 64,
    "num_source": 12,
    "num_target_train": 3,
    "num_target_val": 3,
    "gap": 1.0,
    "harm_rate": 0.7,
    "confusions": {"sidewalk": "road", "terrain": "vegetation", "car": "truck", "bus": "train"},
}


def _digest(root: str) -> str:
    h = hashlib.sha256()
    paths = sorted(
        os.path.relpath(os.path.join(d, n), root)
        for d, _, names in os.walk(root)
        for n in names
        if n.endswith(".png")
    )
    for rel in paths:
        with Image.open(os.path.join(root, rel)) as im:
            h.update(rel.encode())
            h.update(im.mode.encode())
            h.update(repr(im.size).encode())
            h.update(bytes(im.getpalette() or []))
            h.update(im.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> dict[str, str]:
    """One tiny benchmark per kind (default parameters), generated once for the module."""
    base = tmp_path_factory.mktemp("harm")
    roots = {}
    for kind in synthetic.HARM_KINDS:
        roots[kind] = str(base / kind)
        synthetic.write_benchmark(roots[kind], seed=SEED, harm=kind, **TINY)
    roots["default"] = str(base / "default")
    synthetic.write_benchmark(roots["default"], seed=SEED, **TINY)
    return roots


def _truth(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, instances, harm-free source image) of source example i, from the generators
    the module docstring names: (seed, split 0, index, 0) for the scene, 1 for the image."""
    classes, instances = synthetic.render_scene(np.random.default_rng([SEED, 0, i, 0]), H, W)
    rng = np.random.default_rng([SEED, 0, i, 1])
    return classes, instances, synthetic.render_image(classes, instances, rng, "synthetic", 1.0)


def _written(root: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, train-id labels, harmful mask) of every written source example."""
    out = []
    for image_path, label_path in sources.gta5_pairs(os.path.join(root, "gta5")):
        image, label = sources.read_example(image_path, label_path, LUT)
        mask = sources.read_mask(
            os.path.join(root, "gta5", "harmful", os.path.basename(image_path))
        )
        out.append((image, label, mask))
    return out


def test_default_kind_reproduces_main_byte_for_byte(benchmarks) -> None:
    for root in (benchmarks["default"], benchmarks["confusion"]):
        assert _digest(os.path.join(root, "gta5")) == MAIN_GTA5
        assert _digest(os.path.join(root, "cityscapes")) == MAIN_CITYSCAPES
        params = json.load(open(os.path.join(root, "benchmark.json")))["params"]
        assert params == MAIN_PARAMS  # so benchmarks written before the kinds are reused


def test_target_identical_whatever_the_harm(benchmarks) -> None:
    for kind in synthetic.HARM_KINDS:
        assert _digest(os.path.join(benchmarks[kind], "cityscapes")) == MAIN_CITYSCAPES, kind


@pytest.mark.parametrize("kind", ["confusion", "spatial", "noise", "none"])
def test_label_kinds_mask_exactly_the_changed_labels(benchmarks, kind) -> None:
    confusion = synthetic._confusion_table(synthetic.DEFAULT_CONFUSIONS)
    changed_total = 0
    for i, (image, label, mask) in enumerate(_written(benchmarks[kind])):
        classes, instances, clean_image = _truth(i)
        np.testing.assert_array_equal(mask, label != classes)
        np.testing.assert_array_equal(image, clean_image)  # only the labels are harmed
        np.testing.assert_array_equal(label[classes == 255], 255)  # void stays void
        changed_total += mask.sum()
        if kind == "confusion":  # the convention's pairs, nothing else
            np.testing.assert_array_equal(label[mask], confusion[classes[mask]])
        if kind == "noise":  # whole regions, each to one other class
            for j in np.unique(instances[mask]):
                region = instances == j
                assert mask[region].all() and len(np.unique(label[region])) == 1
        if kind == "spatial":  # a wrong pixel lies within spatial_px of its written class
            for c in np.unique(label[mask]):
                near = synthetic._dilate(classes == c, 2)
                assert near[mask & (label == c)].all()
    if kind == "none":
        assert changed_total == 0
    else:
        assert changed_total > 0.02 * 12 * H * W  # the harm is there, not a trickle


def test_appearance_labels_right_mask_exactly_the_re_rendered_pixels(benchmarks) -> None:
    pairs = synthetic.DEFAULT_APPEARANCE
    marked = 0
    for i, (image, label, mask) in enumerate(_written(benchmarks["appearance"])):
        classes, instances, clean_image = _truth(i)
        np.testing.assert_array_equal(label, classes)  # correct labels
        differs = (image != clean_image).any(-1)
        assert not (differs & ~mask).any()  # every other pixel is the harm-free render's
        assert differs[mask].mean() > 0.95  # the marked pixels were drawn again
        for j in np.unique(instances[mask]):  # whole objects of the pairs' classes
            region = instances == j
            assert mask[region].all()
            assert labels.CLASS_NAMES[classes[region][0]] in pairs
        marked += mask.sum()
    assert marked > 0.02 * 12 * H * W


def test_appearance_borrows_the_look_of_the_named_class() -> None:
    classes, instances, _ = _truth(0)
    rng = np.random.default_rng(0)
    labels_, looks = synthetic.source_labels(
        classes, instances, rng, synthetic.harm_params("appearance", appearance_rate=1.0)
    )
    np.testing.assert_array_equal(labels_, classes)
    table = synthetic._confusion_table(synthetic.DEFAULT_APPEARANCE)
    np.testing.assert_array_equal(looks, table[classes])  # rate 1: every object of a pair


def test_coarse_labels_grow_nearer_objects_over_what_is_behind() -> None:
    classes = np.full((9, 9), labels.CLASS_NAMES.index("road"), np.uint8)
    instances = np.zeros((9, 9), np.int32)
    car, person = labels.CLASS_NAMES.index("car"), labels.CLASS_NAMES.index("person")
    classes[3:6, 2:5], instances[3:6, 2:5] = car, 1  # behind
    classes[4:6, 5:7], instances[4:6, 5:7] = person, 2  # in front, touching the car
    classes[6, :], instances[6, :] = 255, 3  # void (ego hood), in front of everything
    out = synthetic.coarse_labels(classes, instances, np.random.default_rng(0), 1.0, 1)
    expected = classes.copy()  # radius 1: the 4 neighbours; void neither grows nor is covered
    expected[2, 2:5] = expected[3:6, 1] = car  # the car's ring on the road
    expected[3, 5:7] = expected[4:6, 7] = person  # over the road and the car's ring
    expected[4:6, 4] = person  # the person's spill covers the car, not the reverse
    np.testing.assert_array_equal(out, expected)
    same = synthetic.coarse_labels(classes, instances, np.random.default_rng(0), 0.0, 3)
    np.testing.assert_array_equal(same, classes)


def test_harm_parameters_decide_reuse(tmp_path) -> None:
    root = str(tmp_path / "b")
    small = dict(TINY, num_source=3, num_target_train=1, num_target_val=1)
    meta = synthetic.write_benchmark(root, seed=1, harm="spatial", **small)
    assert meta["params"]["harm"] == "spatial" and meta["params"]["spatial_px"] == 2
    assert "harm_rate" not in meta["params"]  # a parameter the kind ignores
    stamp = os.path.getmtime(f"{root}/benchmark.json")
    synthetic.write_benchmark(root, seed=1, harm="spatial", noise_rate=0.5, **small)
    assert os.path.getmtime(f"{root}/benchmark.json") == stamp  # reused
    masks = [m for _, _, m in _written(root)]
    synthetic.write_benchmark(root, seed=1, harm="spatial", spatial_px=1, **small)
    assert json.load(open(f"{root}/benchmark.json"))["params"]["spatial_px"] == 1
    assert sum(m.sum() for _, _, m in _written(root)) < sum(m.sum() for m in masks)
    for kind, key in [("noise", "noise_rate"), ("appearance", "appearance"), ("none", "harm")]:
        params = synthetic.write_benchmark(root, seed=1, harm=kind, **small)["params"]
        assert params["harm"] == kind and key in params


BAD = [
    ("harm", "spacial"),
    ("harm", None),
    ("harm", "Confusion"),
    ("spatial_rate", 1.5),
    ("spatial_rate", float("nan")),
    ("spatial_px", 0),
    ("spatial_px", 1.5),
    ("spatial_px", True),
    ("noise_rate", -0.1),
    ("noise_rate", "0.1"),
    ("appearance", "car-truck"),
    ("appearance", "car>lorry"),
    ("appearance", "*>car"),
    ("appearance", 3),
    ("appearance_rate", float("inf")),
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_values_raise_naming_the_field(tmp_path, name, value) -> None:
    field = f"config.data.synthetic_{name}="
    problems = synthetic.harm_problems(**{name: value})
    assert len(problems) == 1 and problems[0].startswith(field), problems
    root = tmp_path / "never"
    with pytest.raises(ValueError, match=f"synthetic_{name}="):
        synthetic.write_benchmark(str(root), seed=0, **TINY, **{name: value})
    assert not root.exists()  # refused before touching the disk


def test_unusual_values_pass() -> None:
    for name, value in [
        ("spatial_rate", 0),
        ("spatial_rate", 1.0),
        ("spatial_px", 5),
        ("noise_rate", 1),
        ("appearance", ""),
        ("appearance", "*>*"),
        ("appearance", "car>*"),
        ("appearance", {"car": "bus"}),
    ]:
        assert synthetic.harm_problems(**{name: value}) == [], (name, value)
    with pytest.raises(TypeError, match="unknown field"):
        synthetic.harm_problems(spatial_pixels=2)


def test_config_defaults_are_the_generator_defaults() -> None:
    data = default.get_config().data
    defaults = {
        k: p.default
        for k, p in inspect.signature(synthetic.write_benchmark).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for name in synthetic.HARM_FIELDS:
        if name != "appearance":
            assert data[f"synthetic_{name}"] == defaults[name], name
    assert synthetic.parse_confusions(data.synthetic_appearance) == synthetic.DEFAULT_APPEARANCE
    assert synthetic.parse_confusions(data.synthetic_confusions) == synthetic.DEFAULT_CONFUSIONS
    assert data.synthetic_harm_rate == defaults["harm_rate"]
    for kind in synthetic.HARM_KINDS:
        from_config = synthetic.harm_kwargs(data) | {"harm": kind}
        assert synthetic.harm_params(**from_config) == synthetic.harm_params(kind), kind
