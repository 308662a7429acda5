"""clu's metric writers write TensorBoard files through TensorBoardWriter, with no TensorFlow.

The files are read back with TensorBoard's own reader (EventAccumulator), which is what the
TensorBoard UI shows; where TensorFlow is installed, they are also compared record by record
with what clu's TensorFlow writer writes.
"""

import glob
import inspect
import io
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from metapix_jax import clu_summary_writer
from metapix_jax.tensorboard_writer import TensorBoardWriter, _to_uint8

# Importing metapix_jax has installed the writer already; what any script that imports clu's
# writers itself must do first, since without TensorFlow they import only after install().
clu_summary_writer.install()
from clu import metric_writers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (4, 5, 1), dtype=np.uint8)  # [H, W, 1]
RGB = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)  # [H, W, 3]
BATCH = RNG.integers(0, 256, (2, 3, 6, 3), dtype=np.uint8)  # [N, H, W, C]
CUSTOM = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="custom")
)
FLOAT = np.linspace(-0.25, 1.25, 2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)


def read(logdir) -> event_accumulator.EventAccumulator:
    """Everything TensorBoard loads from `logdir` (no sampling: size_guidance 0 keeps all)."""
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    return accumulator.Reload()


def values(accumulator, tag: str) -> list[tuple[int, np.ndarray]]:
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]


def plugin(accumulator, tag: str) -> str:
    return accumulator.SummaryMetadata(tag).plugin_data.plugin_name


def decoded(image_tensor: np.ndarray) -> tuple[tuple[int, int], list[np.ndarray]]:
    """(width, height) and the pixels of each PNG, as TensorBoard's image plugin reads them."""
    width, height, *pngs = image_tensor
    return (int(width), int(height)), [np.asarray(Image.open(io.BytesIO(p))) for p in pngs]


def test_default_writer_writes_what_tensorboard_reads(tmp_path) -> None:
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    assert isinstance(writer._writers[-1], TensorBoardWriter)  # Beside clu's LoggingWriter.
    writer.write_scalars(1, {"loss": 0.5, "eval/miou": np.float32(0.25), "n": 3})
    writer.write_scalars(7, {"loss": jnp.float32(0.125), "eval/miou": np.array(0.75)})
    writer.write_images(7, {"grey": GREY, "rgb": RGB, "batch": BATCH, "float": FLOAT})
    writer.write_texts(7, {"note": "**bold**"})
    writer.write_histograms(7, {"hist": np.arange(20.0)}, num_buckets={"hist": 4})
    writer.write_hparams({"lr": 0.1, "model": {"width": 8}})
    writer.write_summaries(
        8, {"raw": np.arange(6.0).reshape(2, 3)}, {"raw": CUSTOM.SerializeToString()}
    )
    writer.close()
    (name,) = os.listdir(tmp_path)
    assert name.startswith("events.out.tfevents.") and name.endswith(".v2")

    tb = read(tmp_path)
    assert values(tb, "loss") == [(1, 0.5), (7, 0.125)]
    assert values(tb, "eval/miou") == [(1, 0.25), (7, 0.75)]
    assert values(tb, "n") == [(1, 3.0)]
    assert {plugin(tb, t) for t in ("loss", "eval/miou", "n")} == {"scalars"}
    assert values(tb, "loss")[0][1].dtype == np.float32  # As tf.summary.scalar stores it.

    for tag, image in (("grey", GREY), ("rgb", RGB), ("batch", BATCH)):
        [(step, tensor)] = values(tb, tag)
        size, pixels = decoded(tensor)
        batch = image if image.ndim == 4 else image[None]
        assert step == 7 and plugin(tb, tag) == "images"
        assert size == (batch.shape[2], batch.shape[1]) and len(pixels) == len(batch)
        for got, want in zip(pixels, batch, strict=True):
            np.testing.assert_array_equal(got, want[..., 0] if want.shape[-1] == 1 else want)
    _, [pixels] = decoded(values(tb, "float")[0][1])
    np.testing.assert_array_equal(pixels, np.clip(FLOAT * 255.5, 0, 255).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255  # Out-of-range values are clipped.

    assert values(tb, "note")[0][1] == b"**bold**" and plugin(tb, "note") == "text"
    [(_, hist)] = values(tb, "hist")
    assert plugin(tb, "hist") == "histograms" and hist.shape == (4, 3)
    np.testing.assert_allclose(hist[:, 2], [5, 5, 5, 5])  # counts
    np.testing.assert_allclose(hist[[0, -1], [0, 1]], [0, 19])  # left and right edges
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        tb.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    ).session_start_info.hparams
    assert {k: v.number_value for k, v in hparams.items()} == {"lr": 0.1, "model.width": 8.0}
    [(step, raw)] = values(tb, "raw")
    assert step == 8 and plugin(tb, "raw") == "custom"
    np.testing.assert_array_equal(raw, np.arange(6.0).reshape(2, 3))


def test_asynchronous_writer_and_collection(tmp_path) -> None:
    """The default (asynchronous) writer writes from clu's pool thread, into logdir/collection."""
    writer = metric_writers.create_default_writer(str(tmp_path), collection="train")
    with metric_writers.ensure_flushes(writer):
        for step in range(3):
            writer.write_scalars(step, {"loss": 1.0 / (step + 1)})
    assert values(read(tmp_path / "train"), "loss") == [(0, 1.0), (1, 0.5), (2, np.float32(1 / 3))]


def test_events_are_on_disk_before_close(tmp_path) -> None:
    """TensorBoard shows a run while it trains, and a killed run keeps what it wrote."""
    writer = TensorBoardWriter(str(tmp_path))
    writer.write_scalars(4, {"loss": 2.0})
    assert values(read(tmp_path), "loss") == [(4, 2.0)]
    writer.close()
    writer.close()  # A second close is harmless (ensure_flushes and callers may both close).


def test_bad_images_and_scalars_are_errors(tmp_path) -> None:
    writer = TensorBoardWriter(str(tmp_path))
    with pytest.raises(ValueError, match="'two_channels_wide'.*expected"):
        writer.write_images(0, {"two_channels_wide": np.zeros((4, 5, 6), np.uint8)})
    with pytest.raises(ValueError, match="'flat'"):
        writer.write_images(0, {"flat": np.zeros((4, 5), np.uint8)})
    with pytest.raises(ValueError, match="'vector'.*not one value"):
        writer.write_scalars(0, {"vector": np.zeros(3)})
    writer.close()


def test_pixel_conversion_follows_tensorflow() -> None:
    """tf.image.convert_image_dtype(x, tf.uint8, saturate=True), values checked against it."""
    floats = np.array([0, 0.5, 0.999, 1, 1.5, -1, np.nan], np.float32)
    np.testing.assert_array_equal(_to_uint8(floats), [0, 127, 255, 255, 255, 0, 0])
    np.testing.assert_array_equal(
        _to_uint8(np.array([0, 255, 256, 65535], np.uint16)), [0, 0, 1, 255]
    )
    np.testing.assert_array_equal(_to_uint8(np.array([-5, 1, 127], np.int8)), [0, 2, 254])
    np.testing.assert_array_equal(
        _to_uint8(np.array([-1, 2**23, 2**31 - 1], np.int32)), [0, 1, 255]
    )
    np.testing.assert_array_equal(_to_uint8(np.array([True, False])), [255, 0])
    assert _to_uint8(GREY) is GREY


def test_writer_implements_clu_interface() -> None:
    """Every MetricWriter method, with clu's parameter names (callers pass them by keyword)."""
    interface = metric_writers.interface
    assert issubclass(TensorBoardWriter, interface.MetricWriter)
    for name in interface.MetricWriter.__abstractmethods__:
        ours = inspect.signature(getattr(TensorBoardWriter, name)).parameters
        theirs = inspect.signature(getattr(interface.MetricWriter, name)).parameters
        assert list(ours) == list(theirs), name
    assert metric_writers.SummaryWriter is TensorBoardWriter
    assert metric_writers.utils.SummaryWriter is TensorBoardWriter


def test_install_is_idempotent() -> None:
    stand_in = sys.modules[clu_summary_writer.CLU_MODULE]
    clu_summary_writer.install()
    assert sys.modules[clu_summary_writer.CLU_MODULE] is stand_in


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_clu_writers_work_where_tensorflow_cannot_be_imported(tmp_path) -> None:
    """As on an install from requirements.txt: clu's writers and periodic actions, no TF."""
    code = f"""
import sys
sys.modules["tensorflow"] = None  # Any import of TensorFlow now fails, installed or not.
import numpy as np
import metapix_jax.tensorboard_writer
from metapix_jax import clu_summary_writer
clu_summary_writer.install()
from clu import metric_writers, periodic_actions
writer = metric_writers.create_default_writer({str(tmp_path)!r}, asynchronous=False)
writer.write_scalars(3, {{"loss": 0.5}})
writer.write_images(3, {{"image": np.full((2, 3, 3), 200, np.uint8)}})
writer.close()
periodic_actions.ReportProgress(num_train_steps=10, writer=writer)
assert sys.modules["tensorflow"] is None
print(type(writer._writers[-1]).__name__)
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["TensorBoardWriter"]
    tb = read(tmp_path)
    assert values(tb, "loss") == [(3, 0.5)]
    _, [pixels] = decoded(values(tb, "image")[0][1])
    np.testing.assert_array_equal(pixels, np.full((2, 3, 3), 200, np.uint8))


def test_install_after_clu_was_imported_still_takes_over(tmp_path) -> None:
    """Import order does not matter: clu imported with its own writer first, then the package."""
    code = f"""
import sys, types
tf_writer = types.ModuleType("clu.metric_writers.summary_writer")  # TensorFlow's, stood in for.
class SummaryWriter:
    def __init__(self, logdir): raise AssertionError("clu's own writer was built")
tf_writer.SummaryWriter = SummaryWriter
sys.modules["clu.metric_writers.summary_writer"] = tf_writer
from clu import metric_writers
assert metric_writers.SummaryWriter is SummaryWriter
import metapix_jax  # installs
writer = metric_writers.create_default_writer({str(tmp_path)!r}, asynchronous=False)
writer.write_scalars(1, {{"x": 2.0}})
writer.close()
print(type(writer._writers[-1]).__name__, metric_writers.SummaryWriter.__name__)
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["TensorBoardWriter", "TensorBoardWriter"]
    assert values(read(tmp_path), "x") == [(1, 2.0)]


def test_package_import_loads_no_writer_dependencies() -> None:
    """install() is cheap: the package import loads no clu, tensorboard or Pillow, only the
    stand-in module name is registered."""
    code = (
        "import sys, metapix_jax; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('clu', 'tensorboard', 'PIL', 'tensorflow')))"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str([clu_summary_writer.CLU_MODULE])


def raw_events(logdir) -> list[event_pb2.Event]:
    (path,) = glob.glob(f"{logdir}/events.out.tfevents.*")
    return [
        event_pb2.Event.FromString(r) for r in event_file_loader.RawEventFileLoader(path).Load()
    ]


def test_same_records_as_clus_tensorflow_writer(tmp_path) -> None:
    """Tag, step, plugin, dtype, shape and value of every record equal TensorFlow's."""
    pytest.importorskip("tensorflow", reason="the comparison needs TensorFlow's writer")
    from clu.metric_writers.tf.summary_writer import SummaryWriter as TensorFlowWriter

    normal = RNG.normal(size=100)
    events = {}
    for name, writer_class in (("tf", TensorFlowWriter), ("ours", TensorBoardWriter)):
        writer = writer_class(str(tmp_path / name))
        writer.write_scalars(2, {"loss": 0.5, "a/b": np.float32(1.25), "n": 7})
        writer.write_images(2, {"grey": GREY[None], "rgb": RGB, "batch": BATCH, "f": FLOAT})
        writer.write_images(2, {"int16": (np.arange(12, dtype=np.int16) * 2000).reshape(2, 2, 3)})
        writer.write_texts(3, {"note": "hello"})
        writer.write_histograms(4, {"h": np.arange(20.0)}, num_buckets={"h": 4})
        writer.write_histograms(4, {"default_buckets": normal})
        writer.write_hparams({"lr": 0.1, "opt": {"name": "sgd"}, "n": 3, "flag": True})
        writer.write_summaries(5, {"raw": np.arange(6.0).reshape(2, 3)}, {"raw": CUSTOM})
        writer.close()
        events[name] = raw_events(tmp_path / name)[1:]  # After the file-version record.

    assert len(events["tf"]) == len(events["ours"]) == 13
    for theirs, ours in zip(events["tf"], events["ours"], strict=True):
        assert ours.step == theirs.step
        [t], [o] = theirs.summary.value, ours.summary.value
        assert (o.tag, o.metadata.plugin_data.plugin_name) == (
            t.tag,
            t.metadata.plugin_data.plugin_name,
        )
        if o.metadata.plugin_data.plugin_name == "hparams":
            # The same session-start info but for its start time.
            info = [
                plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                for v in (t, o)
            ]
            for i in info:
                i.session_start_info.start_time_secs = 0
            assert info[0] == info[1]
            continue
        assert o.metadata == t.metadata and o.tensor.dtype == t.tensor.dtype
        assert o.tensor.tensor_shape == t.tensor.tensor_shape
        if o.metadata.plugin_data.plugin_name == "images":  # PNG bytes differ (zlib settings).
            got, want = (
                decoded(tensor_util.make_ndarray(o.tensor)),
                decoded(tensor_util.make_ndarray(t.tensor)),
            )
            assert got[0] == want[0]
            for a, b in zip(got[1], want[1], strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            assert o.tensor == t.tensor  # Byte for byte.
