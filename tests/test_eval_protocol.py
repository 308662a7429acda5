"""The evaluation protocols against cityscapesscripts' official evaluator (CPU, tiny model).

Our pipeline and eval step compute per-class IoU from batches; the official evaluator reads
labelIds PNGs. The predictions it reads are made here independently: the model's logits at
the network size, upsampled with a numpy bilinear (align corners) interpolation to the
native label size, argmax, mapped to Cityscapes label ids.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from configs import test as test_config
from metapix_jax import evaluate, parallel, steps
from metapix_jax import state as state_lib
from metapix_jax.data import datasets, labels, pipeline, sources, transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = (48, 80)  # label height, width: not a multiple of the network size
NETWORK = (32, 64)


def _instance_ids(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gtFine instanceIds map: the label id, or id * 1000 + instance for the classes that
    have instances (person, car, ...), as the official 16-bit files hold."""
    has_instances = np.zeros(256, bool)
    for label_id, label in id2label.items():
        has_instances[max(label_id, 0)] |= label_id >= 0 and label.hasInstances
    instances = rng.integers(0, 3, ids.shape)
    return np.where(has_instances[ids], ids.astype(np.int64) * 1000 + instances, ids).astype(
        np.uint16
    )


def _write_val(root: str, n: int) -> list[tuple[str, str]]:
    """Cityscapes val: images of random colour blocks, per-pixel random label ids 0..33, and
    the instanceIds beside the labelIds as in the real dataset (our loader ignores them; the
    official evaluator's instance-level score reads them)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        stem = f"city_{i:06d}_000019"
        image = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # blocks of colour
        image = np.asarray(Image.fromarray(image).resize(NATIVE[::-1], Image.Resampling.NEAREST))
        ids = rng.integers(0, 34, NATIVE, dtype=np.uint8)  # the ids official files hold
        for kind, array, name in [
            ("leftImg8bit", image, "leftImg8bit"),
            ("gtFine", ids, "gtFine_labelIds"),
            ("gtFine", _instance_ids(ids, rng), "gtFine_instanceIds"),
        ]:
            os.makedirs(f"{root}/{kind}/val/city", exist_ok=True)
            Image.fromarray(array).save(f"{root}/{kind}/val/city/{stem}_{name}.png")
    return sources.cityscapes_pairs(root, "val")


def _upsample_align_corners(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear HxWxC resize with align_corners=True, written out with numpy indexing."""
    h, w, _ = logits.shape
    ys, xs = np.linspace(0, h - 1, height), np.linspace(0, w - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = logits[y0][:, x0] * (1 - fx) + logits[y0][:, x1] * fx
    bottom = logits[y1][:, x0] * (1 - fx) + logits[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _official(predictions: list[str], ground_truths: list[str], tmp) -> dict:
    """Runs the official evaluator on labelIds PNGs, without environment variables."""
    args = official.args
    args.evalInstLevelScore = False  # instance-level scores need instanceIds files
    args.JSONOutput = False
    args.quiet = True
    args.exportFile = os.path.join(tmp, "official.json")
    return official.evaluateImgLists(predictions, ground_truths, args)


class _Writer:
    def write_scalars(self, step, scalars):
        self.scalars = scalars

    def flush(self):
        pass


def _random_state(config) -> state_lib.TrainState:
    """A random segmenter: He-normal kernels, zero biases, a loud fine branch: it predicts many
    classes. Shapes from `jax.eval_shape`, values from numpy: no slow eager init."""
    shapes = jax.eval_shape(lambda: state_lib.init_segmenter_params(config, jax.random.key(0)))
    rng = np.random.default_rng(1)

    def fill(x):
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 0
        std = np.sqrt(2.0 / fan_in) if fan_in else 0.0
        return rng.normal(0.0, std, x.shape).astype(np.float32)

    params = jax.tree.map(fill, shapes)
    # Louder fine-scale branch (score_pool3): predictions that change within an image.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1000 if "pool3']['kernel" in jax.tree_util.keystr(path) else x, params
    )
    zero = np.zeros((), np.int32)
    return state_lib.TrainState(params, None, None, None, np.zeros(2, np.uint32), zero, zero)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("eval"))
    config = test_config.get_config()
    config.data.height, config.data.width = NETWORK
    config.data.eval_batch = 4  # 3 images: the padding row must not count
    pairs = _write_val(f"{tmp}/cs", 3)
    state = _random_state(config)
    mesh = parallel.make_mesh()
    return tmp, config, pairs, parallel.put_replicated(state, mesh), mesh


def _our_result(setup, protocol: str, source_kind: str = "gta5") -> dict:
    tmp, config, pairs, state, mesh = setup
    config = config.copy_and_resolve_references()
    config.data.eval_protocol = protocol
    config.data.source_kind = source_kind
    val = sources.PngExamples(tuple(pairs), labels.CITYSCAPES_ID_TO_TRAIN_ID)
    data = datasets.Datasets(config, source=None, target_train=val, target_eval=val)
    confusion_fn = steps.make_inference(config, mesh).confusion
    return evaluate.run_evaluation(state, confusion_fn, data, mesh, f"{tmp}/run", _Writer())


def _predicted_train_ids(setup) -> list[np.ndarray]:
    """The model's train ids at the native label size, made independently of our eval step."""
    _, config, pairs, state, mesh = setup
    inference = steps.make_inference(config, mesh)
    predictions = []
    for image_path, label_path in pairs:
        image, _ = sources.read_example(image_path, label_path, labels.CITYSCAPES_ID_TO_TRAIN_ID)
        x, _ = transforms.preprocess(image, image[..., 0], NETWORK, False, "imagenet")
        logits = np.asarray(inference.predict(state, x[None]))[0]
        predictions.append(_upsample_align_corners(logits, *NATIVE).argmax(-1).astype(np.uint8))
    return predictions


def test_full_protocol_equals_the_official_evaluator(setup) -> None:
    tmp, config, pairs, state, mesh = setup
    predictions = []
    for i, train_ids in enumerate(_predicted_train_ids(setup)):
        path = f"{tmp}/pred/{i}.png"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(labels.TRAIN_ID_TO_CITYSCAPES_ID[train_ids]).save(path)
        predictions.append(path)
    assert len(np.unique(np.concatenate([np.asarray(Image.open(p)) for p in predictions]))) >= 3
    reference = _official(predictions, [p[1] for p in pairs], tmp)
    ours = _our_result(setup, "full", source_kind="synthia")
    for name in labels.CLASS_NAMES:
        expected = reference["classScores"][name]
        got = ours["per_class_iou"][name]
        if np.isnan(expected):
            assert got is None, name
        else:
            assert got == pytest.approx(expected, abs=1e-12), name
    assert ours["miou"] == pytest.approx(reference["averageScoreClasses"], abs=1e-12)
    valid = sum(
        (labels.CITYSCAPES_ID_TO_TRAIN_ID[np.asarray(Image.open(p[1]))] != 255).sum() for p in pairs
    )
    assert ours["labeled_pixels"] == valid  # every native label pixel, no padding
    iou = [reference["classScores"][n] for n in labels.CLASS_NAMES]
    for key, classes in [("miou_16", evaluate.SYNTHIA_16), ("miou_13", evaluate.SYNTHIA_13)]:
        assert ours[key] == pytest.approx(np.nanmean([iou[c] for c in classes]), abs=1e-12)


def test_resized_protocol_resizes_labels_nearest(setup) -> None:
    _, _, pairs, _, _ = setup
    kw = dict(batch_size=4, size=NETWORK, normalization="imagenet")
    lut = labels.CITYSCAPES_ID_TO_TRAIN_ID
    resized = next(pipeline.eval_batches(pairs, lut, protocol="resized", **kw))
    full = next(pipeline.eval_batches(pairs, lut, protocol="full", **kw))
    np.testing.assert_array_equal(resized["image"], full["image"])
    assert resized["label"].shape == (4, *NETWORK) and full["label"].shape == (4, *NATIVE)
    for row, (_, label_path) in enumerate(pairs):
        label = lut[np.asarray(Image.open(label_path))]
        small = Image.fromarray(label).resize(NETWORK[::-1], Image.Resampling.NEAREST)
        np.testing.assert_array_equal(resized["label"][row], small)
        np.testing.assert_array_equal(full["label"][row], label)
    assert (full["label"][3] == 255).all()  # the padding row


def test_synthia_class_subsets() -> None:
    names = [labels.CLASS_NAMES[c] for c in range(19) if c not in evaluate.SYNTHIA_16]
    assert names == ["terrain", "truck", "train"]
    names = [labels.CLASS_NAMES[c] for c in evaluate.SYNTHIA_16 if c not in evaluate.SYNTHIA_13]
    assert names == ["wall", "fence", "pole"]
    confusion = np.diag(np.arange(1, 20)).astype(np.int64)
    confusion[0, 1] = 1  # road: 1 TP, 1 FN -> 0.5; sidewalk: 2 TP, 1 FP -> 2/3
    expected = (0.5 + 2 / 3 + 14) / 16
    assert evaluate.subset_mean_iou(confusion, evaluate.SYNTHIA_16) == pytest.approx(expected)


def test_full_protocol_needs_one_label_size(tmp_path) -> None:
    pairs = _write_val(str(tmp_path), 2)
    Image.fromarray(np.zeros((NATIVE[0], NATIVE[1] + 1), np.uint8)).save(pairs[1][1])
    Image.fromarray(np.zeros((NATIVE[0], NATIVE[1] + 1, 3), np.uint8)).save(pairs[1][0])
    kw = dict(batch_size=2, size=NETWORK, normalization="imagenet")
    with pytest.raises(sources.DataError, match="city_000001.*81x48.*80x48.*eval_protocol"):
        list(pipeline.eval_batches(pairs, labels.CITYSCAPES_ID_TO_TRAIN_ID, protocol="full", **kw))
    with pytest.raises(ValueError, match="eval_protocol.*full.*resized"):
        list(pipeline.eval_batches(pairs, labels.CITYSCAPES_ID_TO_TRAIN_ID, protocol="x", **kw))


def test_official_command_line_with_instance_files_equals_ours(setup) -> None:
    """`python -m metapix_jax.data.cityscapes_eval`: the official evaluator's own command line
    (environment variables, ground-truth search, prediction matching, instance-level score
    from the instanceIds files, JSON export) on predict-mode style train-id outputs."""
    tmp, _, pairs, _, _ = setup
    assert all(os.path.isfile(p[1].replace("labelIds", "instanceIds")) for p in pairs)
    for (image_path, _), train_ids in zip(pairs, _predicted_train_ids(setup), strict=True):
        stem = os.path.splitext(os.path.basename(image_path))[0]
        os.makedirs(f"{tmp}/predict/city", exist_ok=True)  # as predict mode writes them:
        Image.fromarray(train_ids).save(f"{tmp}/predict/city/{stem}_trainIds.png")
        Image.fromarray(labels.colorize(train_ids)).save(f"{tmp}/predict/city/{stem}_color.png")
    os.makedirs(f"{tmp}/export", exist_ok=True)
    env = dict(
        os.environ,
        CITYSCAPES_DATASET=f"{tmp}/cs",
        CITYSCAPES_RESULTS=f"{tmp}/results",
        CITYSCAPES_EXPORT_DIR=f"{tmp}/export",
    )
    command = [sys.executable, "-m", "metapix_jax.data.cityscapes_eval"]
    proc = subprocess.run(
        [*command, f"--train_ids_dir={tmp}/predict"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "converted 3 train-id predictions" in proc.stdout
    with open(f"{tmp}/export/resultPixelLevelSemanticLabeling.json") as f:
        reference = json.load(f)
    ours = _our_result(setup, "full")
    assert ours["miou"] == pytest.approx(reference["averageScoreClasses"], abs=1e-12)
    for name in labels.CLASS_NAMES:
        expected, got = reference["classScores"][name], ours["per_class_iou"][name]
        assert got is None if np.isnan(expected) else got == pytest.approx(expected, abs=1e-12)
    # The instance-level score ran (it is what needs np.in1d) and saw instances.
    assert 0 < reference["averageScoreInstClasses"] <= 1
    # Run again, the plain way: label-id predictions already in CITYSCAPES_RESULTS.
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(f"{tmp}/export/resultPixelLevelSemanticLabeling.json") as f:
        assert json.load(f)["averageScoreClasses"] == reference["averageScoreClasses"]
    # A results folder that is not empty is refused (the evaluator would see two predictions
    # per frame): one line, no traceback.
    proc = subprocess.run(
        [*command, f"--train_ids_dir={tmp}/predict"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("DataError: CITYSCAPES_RESULTS=") and "not empty" in proc.stderr


def test_full_protocol_names_the_label_that_differs_from_the_others(tmp_path) -> None:
    """When the FIRST label has the odd size, the error names it (not the second, correct one):
    the label sizes are compared from the PNG headers."""
    pairs = _write_val(str(tmp_path), 4)
    Image.fromarray(np.zeros((NATIVE[0] + 2, NATIVE[1]), np.uint8)).save(pairs[0][1])
    kw = dict(batch_size=2, size=NETWORK, normalization="imagenet", num_threads=1)
    with pytest.raises(sources.DataError) as error:
        list(pipeline.eval_batches(pairs, labels.CITYSCAPES_ID_TO_TRAIN_ID, protocol="full", **kw))
    message = str(error.value)
    assert "3 of 4 are 80x48 (width x height)" in message
    assert f"{pairs[0][1]!r} (80x50)" in message
    assert all(p[1] not in message for p in pairs[1:]) and "eval_protocol" in message
