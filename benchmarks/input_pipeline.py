"""Input-pipeline throughput: PNG decode + resize against prepared array_record records.

    python benchmarks/input_pipeline.py [--frames=8] [--images=24] [--threads=1]

Writes GTA5-sized (1914x1052) frames in the GTA5 layout to a temporary directory (smooth
random scenes, so the PNGs compress about like real ones), prepares them with
`metapix_jax.data.prepare` at each size, then times the training stream (shuffle, read,
resize, flip, normalise, batch 1) for `--images` images per path and prints images/s per
decoding thread. Nothing is downloaded; the core imports no TensorFlow.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metapix_jax.data import labels, pipeline, prepare, sources  # noqa: E402

GTA5_SIZE = (1052, 1914)  # height, width
SIZES = {"paper 1024x512": (512, 1024), "demo 128x64": (64, 128)}


def write_frames(root: str, count: int) -> None:
    """GTA5-layout frames: blocky random scenes with noise, labels with real ids."""
    rng = np.random.default_rng(0)
    ids = labels.TRAIN_ID_TO_CITYSCAPES_ID
    for i in range(count):
        blocks = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize(GTA5_SIZE[::-1], Image.Resampling.BILINEAR)
        noise = rng.integers(-8, 9, (*GTA5_SIZE, 3))
        image = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        label = Image.fromarray(ids[rng.integers(0, 19, (12, 20))].astype(np.uint8))
        label = label.resize(GTA5_SIZE[::-1], Image.Resampling.NEAREST)
        os.makedirs(f"{root}/images", exist_ok=True)
        os.makedirs(f"{root}/labels", exist_ok=True)
        Image.fromarray(image).save(f"{root}/images/{i:05d}.png")
        label.save(f"{root}/labels/{i:05d}.png")


def images_per_second(examples, size, images: int, threads: int) -> float:
    """Training-stream rate (batch 1) after one warm-up batch."""
    stream = pipeline.train_batches(
        examples,
        batch_size=1,
        size=size,
        seed=0,
        flip=True,
        normalization="imagenet",
        num_threads=threads,
    )
    next(stream)
    start = time.perf_counter()
    for _ in range(images):
        next(stream)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="distinct frames written")
    parser.add_argument("--images", type=int, default=24, help="images timed per path")
    parser.add_argument("--threads", type=int, default=1, help="decoding threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_frames(f"{tmp}/gta5", args.frames)
        pairs = sources.gta5_pairs(f"{tmp}/gta5")
        pngs = sources.PngExamples(tuple(pairs), labels.CITYSCAPES_ID_TO_TRAIN_ID)
        png_mb = sum(os.path.getsize(p) for pair in pairs for p in pair) / len(pairs) / 1e6
        print(f"{args.frames} frames {GTA5_SIZE[1]}x{GTA5_SIZE[0]}, {png_mb:.2f} MB of PNG each")
        print(f"{args.images} images per path, batch 1, {args.threads} thread(s)\n")
        print("| output size | path | images/s per thread | MB per example on disk |")
        print("| --- | --- | --- | --- |")
        for name, size in SIZES.items():
            out = f"{tmp}/prepared_{size[0]}"
            prepare.write_prepared(pngs, out, size, num_threads=args.threads)
            prepared = prepare.PreparedExamples(out, size)
            record_mb = os.path.getsize(f"{out}/{prepare.RECORDS}") / len(pairs) / 1e6
            for path, examples, mb in [
                ("PNG", pngs, png_mb),
                ("array_record", prepared, record_mb),
            ]:
                rate = images_per_second(examples, size, args.images, args.threads)
                print(f"| {name} | {path} | {rate / args.threads:.1f} | {mb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
