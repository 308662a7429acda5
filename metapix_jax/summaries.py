"""What a run writes to TensorBoard besides evaluations and images: interval averages.

The jitted steps return their metrics as device scalars; `merge_step_metrics` folds
them into a clu `Collection` that averages over a logging interval without reading them
back (steps flagged non-finite do not count); the host computes the averages only at
log time.
"""

import functools

from clu import metrics

from metapix_jax import nonfinite


@functools.lru_cache
def metrics_collection(names: tuple[str, ...]) -> type[metrics.Collection]:
    """A clu Collection that averages each named scalar over a logging interval.

    Cached: the class is built once per set of names, not at every step.
    """
    return metrics.Collection.create(**{name: metrics.Average.from_output(name) for name in names})


def merge_step_metrics(collection, step_metrics: dict):
    """Adds a step's metrics to the interval's averages; skipped steps do not count."""
    values = {k: v for k, v in step_metrics.items() if k != nonfinite.FLAG}
    cls = metrics_collection(tuple(sorted(values)))
    kept = (step_metrics[nonfinite.FLAG] == 0).reshape(1)
    merged = cls.single_from_model_output(**{k: v.reshape(1) for k, v in values.items()}, mask=kept)
    return merged if collection is None else collection.merge(merged)
