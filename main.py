"""Entry point: `python main.py --config=configs/gta5.py --workdir=DIR [--config.x=...]`.

Parses flags and hands over to the library; modes: train, eval, compare.
"""

import os
import sys

# TensorFlow (imported by clu's writers) prints start-up noise unless told not to; this
# must come before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and results go.")
config_flags.DEFINE_config_file("config", None, "A config file in configs/.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

MODES = ("train", "eval", "compare")


def verbosity_given(argv: list[str]) -> bool:
    """Whether the user chose a log verbosity (absl marks it as set even when not)."""
    return any(a.split("=")[0] in ("-v", "--v", "--verbosity", "-verbosity") for a in argv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not verbosity_given(sys.argv):
        logging.set_verbosity(logging.WARNING)  # Progress lines are printed; -v 0 for INFO logs.
    # Imported here so that --help is fast and flag errors come before JAX starts.
    from metapix_jax import compare, parallel, train

    config = FLAGS.config
    parallel.initialize_distributed(config)  # Before anything touches a JAX device.
    if config.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif config.mode == "eval":
        train.evaluate_checkpoint(config, FLAGS.workdir)
    elif config.mode == "compare":
        compare.run_comparison(config, FLAGS.workdir)
    else:
        raise app.UsageError(f"config.mode must be one of {MODES}, got {config.mode!r}")


if __name__ == "__main__":
    app.run(main)
