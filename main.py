"""Entry point: `python main.py --config=configs/gta5.py --workdir=DIR [--config.x=...]`.

Parses flags, validates the config (before anything is compiled) and hands over to the
library; modes: train, eval, compare, results, predict. Expected failures (a bad config
value, bad data, a non-finite loss, an interruption) end with one line on stderr, not a
traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and results go.")
config_flags.DEFINE_config_file("config", None, "A config file in configs/.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def verbosity_given(argv: list[str]) -> bool:
    """Whether the user chose a log verbosity (absl marks it as set even when not)."""
    return any(a.split("=")[0] in ("-v", "--v", "--verbosity", "-verbosity") for a in argv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not verbosity_given(sys.argv):
        logging.set_verbosity(logging.WARNING)  # Progress lines are printed; -v 0 for INFO logs.
    # Imported here so that --help is fast and flag errors come before JAX starts; the
    # config is checked before the training code (JAX, clu) is even imported.
    from metapix_jax import checkpoints, validation
    from metapix_jax.data import sources

    try:
        validation.validate(FLAGS.config, FLAGS.workdir)
    except validation.ConfigError as e:
        fail(f"ConfigError: {e}", 1)
    from metapix_jax import train

    try:
        run(FLAGS.config, FLAGS.workdir)
    except (
        validation.ConfigError,
        checkpoints.ModelMismatchError,
        sources.DataError,
        train.NonFiniteError,
    ) as e:
        fail(f"{type(e).__name__}: {e}", 1)
    except train.Interrupted as e:
        fail(str(e), e.exit_code)


def run(config, workdir: str) -> None:
    """Dispatches on config.mode (already validated)."""
    from metapix_jax import compare, predict, results, train

    if config.mode == "train":
        train.train_and_evaluate(config, workdir)
    elif config.mode == "eval":
        train.evaluate_checkpoint(config, workdir)
    elif config.mode == "compare":
        compare.run_comparison(config, workdir)
    elif config.mode == "results":
        results.print_results(workdir)
    elif config.mode == "predict":
        predict.run_prediction(config, workdir)


def fail(message: str, exit_code: int) -> None:
    """Ends with the message on stderr (one line per problem) and a non-zero status."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(exit_code)


if __name__ == "__main__":
    app.run(main)
