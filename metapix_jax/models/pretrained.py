"""ImageNet VGG-16 weights into FCN-8s params, from torchvision's .pth or timm's .safetensors.

The paper starts f_theta from ImageNet VGG-16 (REFERENCE section 2): conv1_1..conv5_3 from
`features.*`, fc6/fc7 from the classifier reshaped into convolutions, `score` from the first
19 rows of the ImageNet classifier, score_pool3/score_pool4 at zero, and both copies of the
split blocks from the same weights. Nothing is downloaded: the user points `init.vgg16` at a
file they already have.

A .pth is a pickle, and a plain unpickle runs whatever code the file names. With torch
installed we use `torch.load(weights_only=True)`; without it, a restricted unpickler that
knows only the few names a tensor rebuild needs and refuses every other global. Both torch
formats are read: the zip archive (torch >= 1.6) and the legacy stream that older files
(such as torchvision's 2017 `vgg16-397923af.pth`) use.
"""

import importlib.util
import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any

import ml_dtypes
import numpy as np

PyTree = Any

# torchvision `features.N` indices of conv1_1..conv5_3, grouped by VGG block.
TORCHVISION_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
# The classifier's layers: torchvision names, timm names.
TORCHVISION_FC = ("classifier.0", "classifier.3", "classifier.6")
TIMM_FC = ("pre_logits.fc1", "pre_logits.fc2", "head.fc")

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class WeightFileError(ValueError):
    """A weight file is unreadable, unsafe or not VGG-16; the message names the file."""


# ---- reading torch files without torch ---------------------------------------------------


class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only its element dtype matters here."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    """numpy twin of `torch._utils._rebuild_tensor_v2`: a strided view of the storage.

    A view, not a copy, so that a legacy file's storages (which follow the pickle) can be
    filled in afterwards; the readers copy every tensor out at the end.
    """
    del requires_grad, hooks
    size, stride = tuple(size), tuple(stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if all(n > 0 for n in size) and not 0 <= offset <= last < storage.size:
        raise WeightFileError(f"a tensor of size {size} overruns its storage of {storage.size}")
    strides = tuple(s * storage.dtype.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=strides)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_):
    """numpy twin of `torch._utils._rebuild_parameter`: a parameter is its tensor here."""
    del requires_grad, hooks
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; any global outside the tensor-rebuild set is refused."""

    def __init__(self, file, path: str, load_storage):
        super().__init__(file)
        self.path = path
        self.load_storage = load_storage

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise WeightFileError(
                f"{self.path!r} refers to {module}.{name}, which a weight file has no reason "
                "to contain; refusing to load it (only tensors, storages and OrderedDict are "
                "allowed)"
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightFileError(f"{self.path!r}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise WeightFileError(f"{self.path!r}: storage of unknown type {storage_type!r}")
        return self.load_storage(str(key), storage_type.dtype, int(numel))


def _read_torch_zip(path: str) -> dict:
    """The torch >= 1.6 zip: <name>/data.pkl, raw storages in <name>/data/<key>."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            raise WeightFileError(f"{path!r} is a zip file but holds no data.pkl: not a torch file")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        big = prefix + "byteorder" in names and archive.read(prefix + "byteorder") == b"big"

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise WeightFileError(f"{path!r} lacks the storage {entry!r}")
            raw = np.frombuffer(archive.read(entry), dtype.newbyteorder(">" if big else "<"))
            return raw[:numel].astype(dtype)

        with archive.open(pickles[0]) as f:
            return _RestrictedUnpickler(io.BytesIO(f.read()), path, load_storage).load()


def _read_torch_legacy(path: str) -> dict:
    """The pre-1.6 stream: magic, version, sys info, the pickle, storage keys, raw storages."""
    with open(path, "rb") as f:
        magic = _RestrictedUnpickler(f, path, None).load()
        if magic != _LEGACY_MAGIC:
            raise WeightFileError(f"{path!r} is a pickle but not a torch file (no torch magic)")
        _RestrictedUnpickler(f, path, None).load()  # Protocol version.
        _RestrictedUnpickler(f, path, None).load()  # System info.
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                storages[key] = np.zeros(numel, dtype)
            return storages[key]

        result = _RestrictedUnpickler(f, path, load_storage).load()
        for key in _RestrictedUnpickler(f, path, None).load():
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            data = np.frombuffer(f.read(count * storage.dtype.itemsize), storage.dtype)
            if data.size != count or count != storage.size:
                raise WeightFileError(f"{path!r} is truncated or corrupt in storage {key!r}")
            storage[:] = data  # In place: the tensors are views of it.
    return result


def _torch_load(path: str) -> dict:
    """torch.load without code execution, as numpy arrays."""
    import torch

    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise WeightFileError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def file_kind(path: str) -> str:
    """'torch_zip', 'torch_legacy' or 'safetensors', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if head[:1] == b"\x80":  # A pickle's PROTO opcode.
        return "torch_legacy"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then JSON.
        return "safetensors"
    raise WeightFileError(
        f"{path!r} is not a weight file this loader reads: expected a torch .pth (zip or "
        f"legacy pickle) or a .safetensors file; it starts with {head!r}"
    )


def check_file(path: str) -> None:
    """Raises WeightFileError unless `path` looks like a weight file this loader reads.

    Cheap (the first bytes and the archive's directory or the safetensors header, never the
    tensors), so that config validation refuses a wrong file in a second instead of the
    import failing after the first compilations.
    """
    kind = file_kind(path)
    if kind == "torch_zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightFileError(f"{path!r} is not a readable zip (torch) file: {e}") from e
        if not any(n.endswith("data.pkl") for n in names):
            raise WeightFileError(f"{path!r} is a zip file but holds no data.pkl: not a torch file")
    elif kind == "torch_legacy":
        try:
            with open(path, "rb") as f:
                magic = _RestrictedUnpickler(f, path, None).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise WeightFileError(f"{path!r} is not a readable torch file: {e}") from e
        if magic != _LEGACY_MAGIC:
            raise WeightFileError(f"{path!r} is a pickle but not a torch file (no torch magic)")
    else:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = f.read(min(length, 100_000_000))
        try:
            names = json.loads(header)
        except ValueError as e:
            raise WeightFileError(f"{path!r} has no readable safetensors header: {e}") from e
        if not isinstance(names, dict) or "features.0.weight" not in names:
            raise WeightFileError(
                f"{path!r} is a safetensors file without VGG-16's features.0.weight"
            )


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a torch or safetensors file, by name, as numpy arrays."""
    if not os.path.isfile(path):
        raise WeightFileError(f"init.vgg16={path!r}: no such file")
    kind = file_kind(path)
    if kind == "safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types.
            raise WeightFileError(f"{path!r} is not a readable safetensors file: {e}") from e
    if importlib.util.find_spec("torch") is not None:
        try:
            return _torch_load(path)
        except Exception as e:  # torch's unpickling errors have no common type.
            raise WeightFileError(f"torch.load(weights_only=True) refused {path!r}: {e}") from e
    return read_torch_without_torch(path)


def read_torch_without_torch(path: str) -> dict[str, np.ndarray]:
    """A torch state dict read by the restricted unpickler (no torch needed, no code run)."""
    try:
        if file_kind(path) == "torch_zip":
            state = _read_torch_zip(path)
        else:
            state = _read_torch_legacy(path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
        raise WeightFileError(f"{path!r} is not a readable torch file: {e}") from e
    if not isinstance(state, dict):
        raise WeightFileError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {k: np.array(v) for k, v in state.items()}  # Copies the views out of the storages.


# ---- VGG-16 into FCN-8s -------------------------------------------------------------------


def _conv_hwio(weight: np.ndarray) -> np.ndarray:
    """PyTorch OIHW -> Flax HWIO."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)), dtype=np.float32)


def vgg16_layers(state: dict[str, np.ndarray], path: str) -> dict[str, tuple]:
    """(kernel HWIO, bias) of conv1_1..conv5_3 ('b{block}c{conv}'), fc6, fc7 and the classifier.

    Accepts torchvision names (`classifier.*`, fc as 2-D matrices) and timm's
    (`pre_logits.fc1/fc2` already 4-D, `head.fc`).
    """
    fc_names = TIMM_FC if "pre_logits.fc1.weight" in state else TORCHVISION_FC

    def get(name: str) -> np.ndarray:
        if name not in state:
            shown = ", ".join(sorted(state)[:8])
            raise WeightFileError(
                f"{path!r} has no {name!r}: not a VGG-16 state dict (it has {shown}, ...)"
            )
        return np.asarray(state[name], np.float32)

    layers = {}
    for b, indices in enumerate(TORCHVISION_CONV_INDICES):
        for c, i in enumerate(indices):
            w = get(f"features.{i}.weight")
            if w.ndim != 4:
                raise WeightFileError(f"{path!r}: features.{i}.weight is {w.shape}, not OIHW")
            layers[f"b{b + 1}c{c + 1}"] = (_conv_hwio(w), get(f"features.{i}.bias"))
    fc6, fc7, fc8 = (get(f"{n}.weight") for n in fc_names)
    in_channels = layers["b5c3"][0].shape[-1]
    if fc6.ndim == 2:  # torchvision: (4096, 512*7*7), flattened C, H, W.
        side = int(round(np.sqrt(fc6.shape[1] / in_channels)))
        if side * side * in_channels != fc6.shape[1]:
            raise WeightFileError(
                f"{path!r}: {fc_names[0]}.weight is {fc6.shape}; expected (out, "
                f"{in_channels} * k * k) for a k x k fc6 on {in_channels} channels"
            )
        fc6 = fc6.reshape(fc6.shape[0], in_channels, side, side)
    if fc7.ndim == 2:
        fc7 = fc7[:, :, None, None]
    layers["fc6"] = (_conv_hwio(fc6), get(f"{fc_names[0]}.bias"))
    layers["fc7"] = (_conv_hwio(fc7), get(f"{fc_names[1]}.bias"))
    layers["classifier"] = (fc8.reshape(fc8.shape[0], -1), get(f"{fc_names[2]}.bias"))
    return layers


def _check_shape(name: str, found: np.ndarray, expected: np.ndarray, path: str) -> np.ndarray:
    if tuple(found.shape) != tuple(expected.shape):
        raise WeightFileError(
            f"{path!r}: {name} should have shape {tuple(expected.shape)} for the configured "
            f"model, found {tuple(found.shape)}"
        )
    return found.astype(expected.dtype)


def fcn8s_params_from_vgg16(layers: dict[str, tuple], params: PyTree, path: str) -> PyTree:
    """An FCN8s tree laid out like `params`, every layer from `layers` (pool scores zero)."""
    out = {name: dict(sub) for name, sub in params.items()}

    def put(module: dict, name: str, kernel: np.ndarray, bias: np.ndarray) -> dict:
        return {
            "kernel": _check_shape(f"{name} kernel", kernel, module["kernel"], path),
            "bias": _check_shape(f"{name} bias", bias, module["bias"], path),
        }

    for module_name, sub in params.items():
        for prefix in ("source_block", "target_block", "block"):
            if module_name.startswith(prefix) and module_name[len(prefix) :].isdigit():
                block = module_name[len(prefix) :]
                out[module_name] = {
                    conv: put(sub[conv], f"{module_name}/{conv}", *layers[f"b{block}c{conv[4:]}"])
                    for conv in sub
                }
    out["fc6"] = put(params["fc6"], "fc6", *layers["fc6"])
    out["fc7"] = put(params["fc7"], "fc7", *layers["fc7"])
    num_classes = params["score"]["bias"].shape[0]
    weight, bias = layers["classifier"]
    if weight.shape[0] < num_classes:
        raise WeightFileError(
            f"{path!r}: the classifier has {weight.shape[0]} < {num_classes} rows"
        )
    score_kernel = weight[:num_classes].T[None, None]
    out["score"] = put(params["score"], "score", score_kernel, bias[:num_classes])
    for name in ("score_pool3", "score_pool4"):
        out[name] = {k: np.zeros(v.shape, v.dtype) for k, v in params[name].items()}
    return out


def load_vgg16(path: str, params: PyTree, width: float) -> PyTree:
    """FCN-8s params initialised from the ImageNet VGG-16 in `path` (see the module doc).

    `params` gives the layout and the expected shapes (arrays or jax.ShapeDtypeStruct):
    every leaf is replaced.
    """
    if width != 1.0:
        raise WeightFileError(
            f"init.vgg16 needs model.width=1.0 (the real VGG-16 channels), got {width}"
        )
    layers = vgg16_layers(read_state_dict(path), path)
    return fcn8s_params_from_vgg16(layers, params, path)
