"""A tiny configuration for the tests: 16x32 images, a width-1/16 FCN-8s, a few steps."""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    """The demo's benchmark and model, shrunk until every step compiles and runs in seconds."""
    config = demo.get_config()
    config.data.height = 16
    config.data.width = 32
    config.data.source_batch = 2
    config.data.target_batch = 2
    config.data.eval_batch = 4
    config.data.num_threads = 1
    config.data.synthetic_num_source = 8
    config.data.synthetic_num_target_train = 4
    config.data.synthetic_num_target_val = 6
    config.model.width = 1 / 16
    config.model.split_block = 1  # The paper's split, so the tests cover both copies.
    config.model.fc_dim = 256
    config.weighting.base_channels = 4
    config.schedule.joint_steps = 3
    config.schedule.meta_steps = 2
    config.schedule.weighted_steps = 2
    config.schedule.generations = 2
    config.log_every = 2
    config.image_every = 3
    config.checkpoint_every = 4
    return config
