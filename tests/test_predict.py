"""Predict mode through main.py on the tiny config: PNGs per input, weight maps, errors.

The checkpoint is written here from a fresh state (training takes minutes on busy
cores; predict mode only needs some checkpoint), and the predictions are checked
against the model applied in this process.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import ROOT, run_main
from PIL import Image

from configs import test as test_config
from metapix_jax import checkpoints, losses, predict
from metapix_jax import state as state_lib
from metapix_jax.data import labels, sources, transforms

SIZES = {"a/one.png": (23, 41), "a/b/two.jpg": (16, 32), "three.png": (50, 30)}  # (h, w)


def checkpointable_state(config):
    """A state of the right layout without compiling the initialisers (a minute on busy cores).

    Segmenter params random, everything else zero: a zero U-Net gives weight
    sigmoid(0) = 0.5 at every pixel, which the weight-map test checks exactly.
    """
    shapes = jax.eval_shape(lambda: state_lib.init_state(config))
    rng = np.random.default_rng(0)

    def random(leaf):
        return (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    zeros = lambda leaf: np.zeros(leaf.shape, leaf.dtype)  # noqa: E731
    return shapes.replace(
        params=jax.tree.map(random, shapes.params),
        opt_state=jax.tree.map(zeros, shapes.opt_state),
        unet_params=jax.tree.map(zeros, shapes.unet_params),
        unet_opt_state=jax.tree.map(zeros, shapes.unet_opt_state),
        rng=zeros(shapes.rng),
        step=zeros(shapes.step),
        position=np.array(7, shapes.position.dtype),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a checkpoint of the tiny config's metapix state."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = test_config.get_config()
    state = checkpointable_state(config)
    manager = checkpoints.make_manager(workdir)
    checkpoints.save(manager, state)
    manager.close()
    return workdir, config, state


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return str(folder)


@pytest.fixture(scope="module")
def predicted(trained, inputs, tmp_path_factory):
    workdir, _, _ = trained
    out = str(tmp_path_factory.mktemp("out"))
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={workdir}",
        "--config.mode=predict",
        f"--config.predict.input={inputs}",
        f"--config.predict.output={out}",
        "--config.predict.overlay=0.5",
        "--config.predict.train_ids=True",
        "--config.predict.weights_for=source",
        "--config.predict.num_weight_images=3",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_one_palette_png_per_input_at_its_size(predicted, inputs):
    colors = sorted(
        os.path.relpath(os.path.join(d, f), predicted)
        for d, _, files in os.walk(predicted)
        for f in files
        if f.endswith("_color.png")
    )
    assert colors == sorted(os.path.splitext(n)[0] + "_color.png" for n in SIZES)
    palette = {tuple(c) for c in labels.PALETTE.tolist()}
    for name, (h, w) in SIZES.items():
        stem = os.path.join(predicted, os.path.splitext(name)[0])
        color = read(f"{stem}_color.png")
        assert color.shape == (h, w, 3), name
        assert {tuple(c) for c in color.reshape(-1, 3).tolist()} <= palette, name
        ids = read(f"{stem}_trainIds.png")
        assert ids.shape == (h, w) and ids.max() < 19
        np.testing.assert_array_equal(labels.colorize(ids), color)
        image = np.asarray(Image.open(os.path.join(inputs, name)).convert("RGB"), np.float32)
        overlay = read(f"{stem}_overlay.png").astype(np.float32)
        np.testing.assert_allclose(overlay, 0.5 * image + 0.5 * color, atol=0.51)


def test_predictions_are_the_target_branch_argmax(predicted, inputs, trained):
    """An image already at the network size: no resize, so the ids are the model's argmax."""
    _, config, state = trained
    image = np.asarray(Image.open(os.path.join(inputs, "a/b/two.jpg")).convert("RGB"))
    x, _ = transforms.preprocess(image, image[..., 0], None, False, config.data.normalization)
    model = state_lib.make_segmenter(config)
    _, logits = jax.jit(lambda p, x: model.apply({"params": p}, None, x))(state.params, x[None])
    expected = np.argmax(np.asarray(logits[0]), -1)
    got = read(os.path.join(predicted, "a/b/two_trainIds.png"))
    assert np.mean(got == expected) > 0.99  # Ties and float noise may flip a stray pixel.


def test_weight_maps_of_the_first_source_images(predicted, trained):
    workdir, _, _ = trained
    written = sorted(os.listdir(os.path.join(predicted, "source_weights")))
    assert written == ["00001_weights.png", "00002_weights.png", "00003_weights.png"]
    source = os.path.join(workdir, "benchmark", "gta5")
    for name in written:
        weights = Image.open(os.path.join(predicted, "source_weights", name))
        assert weights.mode == "L"
        stem = name.replace("_weights", "")
        image, label = sources.read_example(
            f"{source}/images/{stem}", f"{source}/labels/{stem}", labels.CITYSCAPES_ID_TO_TRAIN_ID
        )
        assert weights.size == image.shape[1::-1]
        # The zero U-Net's weight 0.5 everywhere, rint(0.5 * 255) = 128; black where unlabeled.
        expected = np.where(label == labels.IGNORE_LABEL, 0, 128)
        np.testing.assert_array_equal(np.asarray(weights), expected)


def test_w19_maps_show_the_labeled_class_weight():
    weights = np.arange(2 * 3 * 19, dtype=np.float32).reshape(2, 3, 19) / 200
    label = np.array([[0, 5, 255], [18, 1, 7]])
    expected = np.array([[0, 19 + 5, 2 * 19 + 18], [3 * 19 + 18, 4 * 19 + 1, 5 * 19 + 7]]) / 200
    got = np.asarray(losses.labeled_class_weight(jnp.asarray(weights), jnp.asarray(label)))
    np.testing.assert_allclose(got, expected)  # Ignored pixels: the last class's (unused) weight.
    w1 = weights[..., 0]
    np.testing.assert_array_equal(losses.labeled_class_weight(w1, label), w1)


def test_no_images_matched_is_a_clear_error(trained, tmp_path):
    workdir, config, _ = trained
    config = config.copy_and_resolve_references()
    config.predict.input = str(tmp_path / "*.png")
    with pytest.raises(sources.DataError, match="matched no images"):
        predict.run_prediction(config, workdir)


def test_no_checkpoint_is_a_clear_error(inputs, tmp_path):
    config = test_config.get_config()
    config.predict.input = inputs
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        predict.run_prediction(config, str(tmp_path))


def test_label_id_predictions_are_read_by_the_official_evaluator(trained, tmp_path):
    """predict.label_ids with predict.color=False: a folder the official evaluator takes as it
    is, whose score equals this project's eval mode on the same checkpoint (both upsample the
    logits to the native 2048x1024-style size)."""
    from test_eval_protocol import _write_val

    workdir, _, _ = trained
    cityscapes, out = str(tmp_path / "cs"), str(tmp_path / "labelIds")
    _write_val(cityscapes, 3)
    proc = run_main(
        "--config=configs/test.py",
        f"--workdir={workdir}",
        "--config.mode=predict",
        f"--config.predict.input={cityscapes}/leftImg8bit/val",
        f"--config.predict.output={out}",
        "--config.predict.color=False",
        "--config.predict.label_ids=True",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = sorted(os.listdir(out))
    assert written and all(name.endswith("_leftImg8bit_labelIds.png") for name in written)
    env = dict(
        os.environ,
        CITYSCAPES_DATASET=cityscapes,
        CITYSCAPES_RESULTS=out,
        CITYSCAPES_EXPORT_DIR=str(tmp_path),
        JAX_PLATFORMS="cpu",
    )
    official = subprocess.run(
        [sys.executable, "-m", "metapix_jax.data.cityscapes_eval"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert official.returncode == 0, official.stdout[-2000:] + official.stderr[-2000:]
    with open(tmp_path / "resultPixelLevelSemanticLabeling.json") as f:
        reference = json.load(f)
    ours = run_main(
        "--config=configs/test.py",
        f"--workdir={workdir}",
        "--config.mode=eval",
        "--config.data.synthetic=False",
        f"--config.data.target_root={cityscapes}",
    )
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "latest.json")) as f:
        evaluated = json.load(f)
    assert evaluated["miou"] == pytest.approx(reference["averageScoreClasses"], abs=1e-9)
