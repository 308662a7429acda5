"""Entry point: `python main.py --config=configs/gta5.py --workdir=DIR [--config.x=...]`.

Parses flags, validates the config (before anything is compiled) and hands over to the
library; modes: train, eval, compare, results, predict. Every expected failure (a bad
flag or config value, bad data, a non-finite loss, an interruption) ends with one line on
stderr and a non-zero status, not a traceback. `--config` also takes a trained run's
`config.json` or its workdir; `--list_fields` prints every config field and its meaning.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from metapix_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and results go.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "A config file in configs/, or a run's config.json or workdir.",
    lock_config=True,
)
flags.DEFINE_bool("list_fields", False, "Print every config field, its default and meaning.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    if FLAGS.list_fields:
        print(cli.field_list())
        return
    if FLAGS.config is None or FLAGS.workdir is None:
        cli.fail("give --config=<configs/*.py, a run's config.json or workdir> and --workdir=DIR")
    if not cli.verbosity_given(sys.argv):
        logging.set_verbosity(logging.WARNING)  # Progress lines are printed; -v 0 for INFO logs.
    config = cli.config_for_mode(FLAGS.config, FLAGS.workdir, cli.overridden_fields(sys.argv))
    cli.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
