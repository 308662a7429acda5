"""TensorBoard event files for clu's metric writers, written without TensorFlow.

clu 0.0.12 writes TensorBoard summaries with `clu.metric_writers.tf.summary_writer`, which
imports TensorFlow (1.3 GB installed, seconds to import) only to serialise a few protocol
buffers into a record file. The `tensorboard` package holds those protos, the record format and
the helpers that build histogram, text and hparams summaries, so `TensorBoardWriter` writes the
same events with tensorboard, numpy and Pillow alone. `metapix_jax.clu_summary_writer.install()`
makes clu build it in place of its TensorFlow writer (see there for why always).

The files are the same as TensorFlow's: each value is the Summary proto TensorFlow's writer
writes (same tag, step, plugin, dtype and shape; images as PNGs of the same pixels), one event
per value, in a file named like TensorFlow's. tests/test_tensorboard_writer.py compares the two
writers record by record where TensorFlow is installed.

What TensorFlow's writer had and this one lacks: audio summaries (the project writes none; a
warning says so, as clu's writer does for videos) and `tf.io.gfile`'s remote file systems. Paths
go through `etils.epath`, which writes local paths itself and remote ones (gs://) where it has a
backend for them.

This module imports no clu: clu imports it, through `clu_summary_writer`.
"""

import io
import itertools
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

_PNG_CHANNELS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA: what PNG (and TF) encode.


class TensorBoardWriter:
    """A clu `MetricWriter` that appends TensorBoard events to one new file in `logdir`.

    Same constructor as clu's TensorFlow `SummaryWriter` (`create_default_writer` passes the
    log dir, with the collection already joined to it). Every write call ends with a flush:
    they come once per log interval, and a flushed file is what TensorBoard shows during a run
    and what survives a killed one. Calls may come from several threads (clu's asynchronous
    writer uses a pool); a lock keeps records whole.
    """

    def __init__(self, logdir: str) -> None:
        path = epath.Path(logdir)
        path.mkdir(parents=True, exist_ok=True)
        # TensorFlow's name for a v2 summary file; TensorBoard reads every events.out.tfevents.*.
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        name = f"events.out.tfevents.{stamp}.{next(_file_counter)}.v2"
        self.path = path / name
        self._file = self.path.open("wb")
        self._records = RecordWriter(self._file)
        self._lock = threading.Lock()
        self._closed = False
        version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        version.source_metadata.writer = __name__
        self._write([version])

    def write_summaries(
        self,
        step: int,
        values: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Arbitrary tensors with their SummaryMetadata (a proto or its serialised bytes)."""
        summaries = []
        for tag, value in values.items():
            md = metadata.get(tag) if metadata is not None else None
            if isinstance(md, bytes):
                md = summary_pb2.SummaryMetadata.FromString(md)
            tensor = tensor_util.make_tensor_proto(np.asarray(value))
            summaries.append(summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=md))
        self._write_values(step, summaries)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """float32 scalar tensors under the "scalars" plugin, as `tf.summary.scalar` writes."""
        values = []
        for tag, scalar in scalars.items():
            array = np.asarray(scalar, np.float32)
            if array.size != 1:
                raise ValueError(f"scalar {tag!r} has shape {array.shape}, not one value")
            values.append(_value(tag, _tensor(array.reshape(())), "scalars"))
        self._write_values(step, values)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """[N, H, W, C] or [H, W, C] images (C = 1, 2, 3 or 4) as PNGs, all N of them.

        uint8 is written as is; floats are taken as [0, 1] and other integers as their full
        range, converted like `tf.summary.image` does (`tf.image.convert_image_dtype` with
        saturation), so that both writers store the same pixels.
        """
        from PIL import Image  # Only image-writing runs need Pillow loaded.

        values = []
        for tag, image in images.items():
            pixels = _to_uint8(np.asarray(image))
            if pixels.ndim == 3:
                pixels = pixels[None]
            if pixels.ndim != 4 or pixels.shape[-1] not in _PNG_CHANNELS:
                raise ValueError(
                    f"image {tag!r} has shape {pixels.shape}; expected [N, H, W, C] or "
                    f"[H, W, C] with C in {_PNG_CHANNELS}"
                )
            pngs = []
            for picture in pixels:
                buffer = io.BytesIO()
                Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(
                    buffer, format="PNG"
                )
                pngs.append(buffer.getvalue())
            height, width = pixels.shape[1:3]
            # The image plugin's layout: width, height, then one encoded image per element.
            tensor = tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=_shape((2 + len(pngs),)),
                string_val=[str(width).encode(), str(height).encode(), *pngs],
            )
            values.append(_value(tag, tensor, "images"))
        self._write_values(step, values)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        """Not written: TensorBoard has no video plugin (clu's TensorFlow writer skips them too)."""
        logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write videos.", 1)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        """Not written (clu's TensorFlow writer encoded WAV with TensorFlow; the project has no
        audio to log)."""
        logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write audios.", 1)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """String scalars under the "text" plugin (TensorBoard renders them as markdown)."""
        self._write_values(
            step, [_first_value(text_summary.text_pb(k, v)) for k, v in texts.items()]
        )

    def write_histograms(
        self,
        step: int,
        arrays: Mapping[str, Any],
        num_buckets: Mapping[str, int] | None = None,
    ) -> None:
        """[buckets, 3] (left edge, right edge, count) tensors, as `tf.summary.histogram`."""
        values = []
        for tag, array in arrays.items():
            buckets = num_buckets.get(tag) if num_buckets is not None else None
            pb = histogram_summary.histogram_pb(tag, np.asarray(array), buckets=buckets)
            values.append(_first_value(pb))
        self._write_values(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hparams plugin's session-start summary at step 0, keys flattened like clu's."""
        from clu.internal import utils  # clu's own flattening ("a.b" keys); imports no TF.

        pb = hparams_summary.hparams_pb(dict(utils.flatten_dict(hparams)))
        self._write_values(0, list(pb.value))

    def flush(self) -> None:
        """Everything written so far is in the file (each write call flushes already)."""
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file; later closes do nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()

    def _write_values(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        """One event per value, as TensorFlow's writer does."""
        now = time.time()
        events = [
            event_pb2.Event(wall_time=now, step=int(step), summary=summary_pb2.Summary(value=[v]))
            for v in values
        ]
        self._write(events)

    def _write(self, events: list[event_pb2.Event]) -> None:
        with self._lock:
            for event in events:
                self._records.write(event.SerializeToString())
            self._file.flush()


_file_counter = itertools.count()
"""Tells apart files opened in the same second by one process (TensorFlow's names do too)."""


def _shape(dims: tuple[int, ...]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
    )


def _tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A float32 tensor with its bytes in tensor_content, the way TensorFlow serialises one."""
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=_shape(array.shape),
        tensor_content=np.ascontiguousarray(array, "<f4").tobytes(),
    )


def _value(tag: str, tensor: tensor_pb2.TensorProto, plugin: str) -> summary_pb2.Summary.Value:
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
    )
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)


def _first_value(summary: summary_pb2.Summary) -> summary_pb2.Summary.Value:
    (value,) = summary.value
    return value


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixels as `tf.image.convert_image_dtype(x, tf.uint8, saturate=True)` makes them."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "iu":
        top = int(np.iinfo(array.dtype).max) + 1
        if top >= 256:  # Wider than uint8: keep the top 8 bits.
            scaled = array // (top // 256)
        else:  # int8: widened first, so that 127 * 2 does not overflow.
            scaled = array.astype(np.int16) * (256 // top)
        return np.clip(scaled, 0, 255).astype(np.uint8)
    # Floats (also bfloat16 and bool): [0, 1] -> [0, 255.5), truncated, as TensorFlow does.
    scaled = np.nan_to_num(array.astype(np.float32)) * 255.5
    return np.clip(scaled, 0, 255).astype(np.uint8)
