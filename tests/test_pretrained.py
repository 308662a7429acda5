"""ImageNet VGG-16 import: torch .pth (zip and legacy) without torch, timm safetensors.

The .pth files are written here in torch's documented layouts by a small writer that
pickles the same globals torch does, so no torch and no download is needed. The Flax
features after import are checked against a numpy forward of the same weights.
"""

import contextlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import test as test_config
from metapix_jax import state as state_lib
from metapix_jax.models import pretrained
from metapix_jax.models.fcn8s import FCN8s

FC_DIM = 64  # fc6/fc7 channels of the fake VGG (4096 in the real one; fc6 alone is 400 MB).
CONV_SHAPES = (
    (64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
    (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
)  # fmt: skip
CONV_INDICES = [i for block in pretrained.TORCHVISION_CONV_INDICES for i in block]


# ---- a torch-format writer (no torch) ---------------------------------------------------


@contextlib.contextmanager
def fake_torch_globals():
    """Modules named torch / torch._utils, so pickle writes the globals torch writes."""
    torch_mod, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: only pickled by reference")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    torch_mod._utils = utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch", torch_mod)
        mp.setitem(sys.modules, "torch._utils", utils)
        yield torch_mod


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            float_storage = sys.modules["torch"].FloatStorage
            return ("storage", float_storage, obj.key, "cpu", obj.data.size)
        return None


def contiguous_tensors(state: dict[str, np.ndarray]) -> tuple[OrderedDict, list[_Storage]]:
    """One storage per array, each tensor the whole of its storage (what torch.save writes)."""
    storages, tensors = [], OrderedDict()
    for key, (name, array) in enumerate(state.items()):
        storage = _Storage(str(key), np.ascontiguousarray(array, np.float32).ravel())
        storages.append(storage)
        strides = np.ascontiguousarray(array).strides
        stride = tuple(s // array.itemsize for s in strides)
        tensors[name] = _Tensor(storage, 0, array.shape, stride)
    return tensors, storages


def pickled(tensors: OrderedDict) -> bytes:
    buffer = io.BytesIO()
    with fake_torch_globals():
        _TorchPickler(buffer, protocol=2).dump(tensors)
    return buffer.getvalue()


def write_torch_zip(path: str, tensors: OrderedDict, storages: list[_Storage]) -> None:
    """torch >= 1.6 layout: archive/data.pkl, archive/data/<key>, archive/version."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled(tensors))
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.data.astype("<f4").tobytes())
        z.writestr("archive/version", "3\n")


def write_torch_legacy(path: str, tensors: OrderedDict, storages: list[_Storage]) -> None:
    """Pre-1.6 stream: magic, version, sys info, pickle, storage keys, (numel, bytes)..."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pickled(tensors))
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size) + s.data.astype("<f4").tobytes())


# ---- random VGG-16 weights ------------------------------------------------------------------


def random_vgg16(seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision-named VGG-16 weights (He-scaled so activations stay O(1)), fc at FC_DIM."""
    rng = np.random.default_rng(seed)
    state = {}
    for i, (out_c, in_c) in zip(CONV_INDICES, CONV_SHAPES, strict=True):
        std = np.sqrt(2.0 / (9 * in_c))
        state[f"features.{i}.weight"] = rng.normal(0, std, (out_c, in_c, 3, 3)).astype(np.float32)
        state[f"features.{i}.bias"] = rng.normal(0, 0.1, out_c).astype(np.float32)
    for name, shape in (("0", (FC_DIM, 512 * 49)), ("3", (FC_DIM, FC_DIM)), ("6", (1000, FC_DIM))):
        state[f"classifier.{name}.weight"] = rng.normal(0, 0.02, shape).astype(np.float32)
        state[f"classifier.{name}.bias"] = rng.normal(0, 0.1, shape[0]).astype(np.float32)
    return state


def as_timm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under timm's vgg16.tv_in1k names (fc1/fc2 as 4-D convs)."""
    out = {k: v for k, v in state.items() if k.startswith("features.")}
    out["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(FC_DIM, 512, 7, 7)
    out["pre_logits.fc1.bias"] = state["classifier.0.bias"]
    out["pre_logits.fc2.weight"] = state["classifier.3.weight"][:, :, None, None]
    out["pre_logits.fc2.bias"] = state["classifier.3.bias"]
    out["head.fc.weight"] = state["classifier.6.weight"]
    out["head.fc.bias"] = state["classifier.6.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, np.ndarray]:
    return random_vgg16()


@pytest.fixture(scope="module")
def pth_path(tmp_path_factory, vgg_state) -> str:
    path = str(tmp_path_factory.mktemp("weights") / "vgg16-fake.pth")
    write_torch_zip(path, *contiguous_tensors(vgg_state))
    return path


def model_and_params(split_block: int = 1, size: int = 36):
    """The model and its param shapes (the import replaces every leaf: no init needed)."""
    model = FCN8s(width=1.0, fc_dim=FC_DIM, fc6_padding="SAME", split_block=split_block)
    x = np.zeros((1, size, size, 3), np.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x, x)["params"], jax.random.PRNGKey(0))
    return model, shapes


# ---- numpy reference forward -------------------------------------------------------------


def conv3x3_reference(x: np.ndarray, weight_oihw: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """out[h, w, o] = sum_{i, dy, dx} pad(x)[h+dy, w+dx, i] * W[o, i, dy, dx] + b[o]."""
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, weight_oihw.shape[0]), np.float64)
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + h, dx : dx + w] @ weight_oihw[:, :, dy, dx].T
    return out + bias


def max_pool_ceil_reference(x: np.ndarray) -> np.ndarray:
    """2x2/2 max-pool, ceil mode: odd sizes pad with -inf so the last row/column is kept."""
    h, w, c = x.shape
    padded = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
    return padded.reshape((h + h % 2) // 2, 2, (w + w % 2) // 2, 2, c).max(axis=(1, 3))


def vgg_pools_reference(image: np.ndarray, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    x, pools = image.astype(np.float64), []
    for block in pretrained.TORCHVISION_CONV_INDICES:
        for i in block:
            weight, bias = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
            x = np.maximum(conv3x3_reference(x, weight, bias), 0)
        x = max_pool_ceil_reference(x)
        pools.append(x)
    return pools


# ---- tests -------------------------------------------------------------------------------


def test_torch_zip_without_torch_round_trips_the_tensors(pth_path, vgg_state):
    loaded = pretrained.read_torch_without_torch(pth_path)
    assert list(loaded) == list(vgg_state)
    for name, array in vgg_state.items():
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


@pytest.mark.parametrize("writer", [write_torch_zip, write_torch_legacy])
def test_storage_offsets_strides_and_sharing_are_honoured(tmp_path, writer):
    """Two tensors in one storage: a transposed 3x4 view at offset 5, and a slice at 17."""
    data = np.arange(30, dtype=np.float32)
    storage = _Storage("0", data)
    tensors = OrderedDict(
        transposed=_Tensor(storage, 5, (4, 3), (1, 4)),
        tail=_Tensor(storage, 17, (2, 5), (5, 1)),
    )
    path = str(tmp_path / "shared.pth")
    writer(path, tensors, [storage])
    loaded = pretrained.read_torch_without_torch(path)
    np.testing.assert_array_equal(loaded["transposed"], data[5:17].reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["tail"], data[17:27].reshape(2, 5))


def test_a_forbidden_global_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(pretrained.WeightFileError, match=r"system.*refusing"):
        pretrained.read_torch_without_torch(path)
    assert not marker.exists()


def test_a_file_of_the_wrong_kind_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(pretrained.WeightFileError, match="notes.pth.*not a weight file"):
        pretrained.read_state_dict(str(path))
    with pytest.raises(pretrained.WeightFileError, match="no such file"):
        pretrained.read_state_dict(str(tmp_path / "missing.pth"))


def test_missing_keys_and_wrong_shapes_name_the_key(tmp_path, vgg_state):
    _, params = model_and_params()
    partial = {k: v for k, v in vgg_state.items() if k != "features.10.weight"}
    path = str(tmp_path / "partial.pth")
    write_torch_zip(path, *contiguous_tensors(partial))
    with pytest.raises(pretrained.WeightFileError, match="features.10.weight"):
        pretrained.load_vgg16(path, params, 1.0)
    wrong = dict(vgg_state, **{"features.0.weight": np.zeros((32, 3, 3, 3), np.float32)})
    write_torch_zip(path, *contiguous_tensors(wrong))
    shapes = r"block1/conv1 kernel.*\(3, 3, 3, 64\).*\(3, 3, 3, 32\)"
    with pytest.raises(pretrained.WeightFileError, match=shapes):
        pretrained.load_vgg16(path, params, 1.0)


def test_width_other_than_one_is_refused(pth_path):
    with pytest.raises(pretrained.WeightFileError, match="model.width=1.0"):
        pretrained.load_vgg16(pth_path, {}, 0.5)


def test_imported_features_match_a_numpy_forward(pth_path, vgg_state):
    """pool1..pool5 of both branches (36x36: odd sizes exercise ceil mode) vs numpy."""
    model, params = model_and_params(split_block=1)
    params = pretrained.load_vgg16(pth_path, params, 1.0)
    image = np.random.default_rng(1).normal(size=(1, 36, 36, 3)).astype(np.float32)
    expected = vgg_pools_reference(image[0], vgg_state)
    for domain in ("source", "target"):
        inputs = {domain: image}
        _, state = model.apply(
            {"params": params}, **inputs, capture_intermediates=True, mutable=["intermediates"]
        )
        inter = state["intermediates"]
        names = [f"{domain}_block1", "block2", "block3", "block4", "block5"]
        for name, ref in zip(names, expected, strict=True):
            got = np.asarray(inter[name]["__call__"][0][0])
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got / scale, ref / scale, atol=2e-5, err_msg=name)
    assert [r.shape[0] for r in expected] == [18, 9, 5, 3, 2]


def test_classifier_layers_land_where_torch_puts_them(pth_path, vgg_state):
    _, params = model_and_params()
    params = pretrained.load_vgg16(pth_path, params, 1.0)
    # score = classifier.6 rows 0..18 as a 1x1 conv; pool branches start at zero.
    w6, b6 = vgg_state["classifier.6.weight"], vgg_state["classifier.6.bias"]
    np.testing.assert_array_equal(params["score"]["kernel"][0, 0], w6[:19].T)
    np.testing.assert_array_equal(params["score"]["bias"], b6[:19])
    for name in ("score_pool3", "score_pool4"):
        assert not np.any(params[name]["kernel"]) and not np.any(params[name]["bias"])
    # fc6 on a 7x7x512 patch equals classifier.0 on torch's flattening (C, H, W) of it.
    patch = np.random.default_rng(2).normal(size=(7, 7, 512)).astype(np.float32)
    conv = np.einsum("hwi,hwio->o", patch, params["fc6"]["kernel"]) + params["fc6"]["bias"]
    linear = vgg_state["classifier.0.weight"] @ patch.transpose(2, 0, 1).ravel()
    np.testing.assert_allclose(conv, linear + vgg_state["classifier.0.bias"], rtol=1e-4, atol=1e-4)
    fc7 = np.asarray(params["fc7"]["kernel"][0, 0])
    np.testing.assert_array_equal(fc7, vgg_state["classifier.3.weight"].T)
    # Both copies of the split block come from the same weights.
    for a, b in zip(
        jax.tree.leaves(params["source_block1"]),
        jax.tree.leaves(params["target_block1"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_timm_safetensors_gives_the_same_params(tmp_path, pth_path, vgg_state):
    path = str(tmp_path / "model.safetensors")
    save_file(as_timm(vgg_state), path)
    assert pretrained.file_kind(path) == "safetensors"
    _, params = model_and_params()
    from_pth = pretrained.load_vgg16(pth_path, params, 1.0)
    from_timm = pretrained.load_vgg16(path, params, 1.0)
    for (path_a, a), b in zip(
        jax.tree_util.tree_leaves_with_path(from_pth), jax.tree.leaves(from_timm), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path_a))


def test_initial_params_load_the_configured_weights(pth_path, vgg_state):
    """What init_state uses for the segmenter (the U-Net's eager init is too slow here)."""
    config = test_config.get_config()
    config.model.width = 1.0
    config.model.fc_dim = FC_DIM
    config.model.fc6_kernel = 7
    config.model.fc6_padding = "SAME"
    config.init.vgg16 = pth_path
    key = jax.random.PRNGKey(0)
    params = state_lib.initial_segmenter_params(config, key)
    kernel = np.asarray(params["target_block1"]["conv1"]["kernel"])
    np.testing.assert_array_equal(kernel, vgg_state["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["block5"]["conv3"]["bias"], vgg_state["features.28.bias"])
    config.model.width = 1 / 16
    with pytest.raises(pretrained.WeightFileError, match="model.width"):
        state_lib.initial_segmenter_params(config, key)


def test_real_torch_save_reads_the_same_without_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed on the CPU machines")
    state = OrderedDict(
        a=torch.randn(3, 4),
        transposed=torch.randn(5, 6).t(),
        half=torch.randn(2, 3).half(),
        view=torch.arange(20.0)[3:15].view(3, 4),
    )
    path = str(tmp_path / "real.pth")
    torch.save(state, path)
    ours = pretrained.read_torch_without_torch(path)
    for name, tensor in state.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)
    legacy = str(tmp_path / "legacy.pth")
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for name, tensor in state.items():
        np.testing.assert_array_equal(
            pretrained.read_torch_without_torch(legacy)[name], tensor.numpy()
        )


# ---- the paper's configs -------------------------------------------------------------------


def test_paper_configs_hold_the_papers_setting():
    from configs import gta5, synthia

    config = gta5.get_config()
    assert (config.data.height, config.data.width) == (512, 1024)
    assert (config.data.source_batch, config.data.target_batch) == (1, 1)
    assert state_lib.total_segmenter_steps(config) == 195_000  # 150K + 3 x 15K.
    assert config.schedule.meta_steps == 10_000 and config.schedule.generations == 3
    assert config.optim.learning_rate == config.meta.inner_learning_rate == 1e-4
    assert (config.model.split_block, config.weighting.kind, config.seed) == (1, "w1", 1234)
    assert config.model.width == 1.0 and config.model.fc_dim == 4096
    other = synthia.get_config()
    assert other.data.source_kind == "synthia"
    del other.data["source_kind"]
    if "source_kind" in config.data:  # Declared by default.py once the data branch is in.
        del config.data["source_kind"]
    assert other.to_dict() == config.to_dict()  # Only the source dataset differs.


@pytest.mark.parametrize("name", ["gta5", "synthia"])
def test_paper_configs_without_data_roots_fail_clearly(name, tmp_path):
    import importlib

    from metapix_jax import train

    config = importlib.import_module(f"configs.{name}").get_config()
    # Today the loader's DataError (a ValueError) names the empty root; config validation
    # may name the field instead.
    with pytest.raises(ValueError, match=r"source_root|root '' does not exist"):
        train.train_and_evaluate(config, str(tmp_path))
