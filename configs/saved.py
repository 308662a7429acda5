"""A trained run's own config: what `--config=WORKDIR` or `--config=WORKDIR/config.json` loads.

main.py turns such a `--config` into `--config=configs/saved.py:<path>`; the run's recorded
values then stand on top of configs/default.py's, and `--config.x=...` overrides them as
with any other config file.
"""

import os

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
    """The config recorded in `path` (a config.json, or a workdir holding one)."""
    from metapix_jax import workdir

    if not path.endswith(".json"):
        path = os.path.join(path, workdir.CONFIG_FILE)
    return workdir.load_config(path)
