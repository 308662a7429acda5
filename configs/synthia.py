"""The paper's SYNTHIA -> Cityscapes run (Table 2, MetaPix-W1: 66.7 mIoU).

Same model, schedule and hyper-parameters as the GTA5 run (paper 4.5 changes only the
source dataset): SYNTHIA-RAND-CITYSCAPES, 9,400 images, resized to 1024x512.

    python main.py --config=configs/synthia.py --workdir=/runs/synthia \
      --config.data.source_root=/data/RAND_CITYSCAPES \
      --config.data.target_root=/data/cityscapes --config.init.vgg16=/weights/vgg16.pth
"""

import ml_collections

from configs import gta5


def get_config() -> ml_collections.ConfigDict:
    """SYNTHIA-RAND-CITYSCAPES + Cityscapes train -> Cityscapes val, MetaPix-W1."""
    config = gta5.get_config()
    config.data.source_root = ""  # Required: SYNTHIA layout (RGB/, GT/LABELS/).
    # The SYNTHIA layout and label map; evaluation also reports the 16- and 13-class mIoU.
    config.data.source_kind = "synthia"
    return config
