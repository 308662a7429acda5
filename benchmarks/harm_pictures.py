"""Pictures of the embedded benchmark's kinds of harm, one PNG per kind.

Each picture shows the first few source images of the benchmark a config generates, the
labels written for them (Cityscapes colours) and the mask of harmful pixels written to
gta5/harmful/ (white), so that a reader sees what each `data.synthetic_harm` does without
generating anything. Nothing is written but the pictures.

  python benchmarks/harm_pictures.py --config=configs/demo.py --out=docs

writes docs/harm_<kind>.png for every kind; the config gives the seed, the image size, the gap
and each kind's parameters (e.g. --config.data.synthetic_spatial_px=3).
"""

import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metapix_jax.data import labels, synthetic  # noqa: E402

flags.DEFINE_string("out", "docs", "Folder for the pictures (harm_<kind>.png).")
flags.DEFINE_list("kinds", list(synthetic.HARM_KINDS), "Kinds of harm to draw.")
flags.DEFINE_integer("num_images", 3, "Source images per picture (the first ones).")
flags.DEFINE_integer("scale", 2, "Pixel replication of every tile, for legibility.")
config_flags.DEFINE_config_file("config", None, "A config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

_GAP = 4  # pixels between tiles
_HEAD = 14  # height of a text line


def picture(data, kind: str, num_images: int, scale: int) -> Image.Image:
    """Rows of (source image, written labels, harmful mask) for the first source images."""
    harm = synthetic.harm_params(**{**synthetic.harm_kwargs(data), "harm": kind})
    rows = []
    harmful_pixels = total = 0
    for i in range(num_images):
        image, _, written, harmful = synthetic.render_example(
            data.synthetic_seed, "source", i, data.height, data.width, data.synthetic_gap, harm
        )
        mask = np.repeat((harmful * 255).astype(np.uint8)[..., None], 3, -1)
        rows.append([image, labels.colorize(written), mask])
        harmful_pixels, total = harmful_pixels + harmful.sum(), total + harmful.size
    h, w = data.height * scale, data.width * scale
    canvas = Image.new("RGB", (3 * w + 2 * _GAP, 2 * _HEAD + num_images * (h + _GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    shown = {k: v for k, v in harm.items() if k != "harm"}
    title = f"harm='{kind}' {shown}" if shown else f"harm='{kind}'"
    draw.text((0, 0), title, fill="black")
    for j, name in enumerate(("source image", "written labels", "harmful pixels")):
        draw.text((j * (w + _GAP), _HEAD), name, fill="black")
    for r, tiles in enumerate(rows):
        for j, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(big, (j * (w + _GAP), 2 * _HEAD + r * (h + _GAP)))
    print(f"{kind}: {100 * harmful_pixels / total:.1f}% harmful pixels in these images")
    return canvas


def main(_) -> None:
    unknown = set(FLAGS.kinds) - set(synthetic.HARM_KINDS)
    if unknown:
        raise app.UsageError(f"--kinds: {sorted(unknown)} not in {synthetic.HARM_KINDS}")
    os.makedirs(FLAGS.out, exist_ok=True)
    for kind in FLAGS.kinds:
        path = os.path.join(FLAGS.out, f"harm_{kind}.png")
        # A 256-colour palette keeps each picture at tens of KB; the noisy source images
        # would otherwise not compress.
        pic = picture(FLAGS.config.data, kind, FLAGS.num_images, FLAGS.scale)
        pic.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
        print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


if __name__ == "__main__":
    app.run(main)
