"""Makes clu's metric writers write TensorBoard files with `TensorBoardWriter`, not TensorFlow.

clu's `metric_writers` package imports `clu.metric_writers.summary_writer` for its
`SummaryWriter` (what `create_default_writer` builds for a log dir), and that module imports
TensorFlow; so without TensorFlow neither `clu.metric_writers` nor `clu.periodic_actions`
imports. `install()` puts a stand-in module under that name in `sys.modules` before clu's
package is imported; clu then finds `metapix_jax.tensorboard_writer.TensorBoardWriter` there and
never imports TensorFlow. Nothing else in clu changes: `create_default_writer`, `MultiWriter`,
`AsyncMultiWriter`, `ensure_flushes` and `periodic_actions` work as documented.

Always this writer, not only when TensorFlow is missing:
- One code path: the writer the tests check is the writer every run uses, on every host.
- Nothing is lost: the event files hold the same summaries (see tensorboard_writer).
- No run pays TensorFlow's start-up (5-10 s on a 2-core CPU), even where it is installed.

`metapix_jax/__init__.py` calls `install()`, so it has run before any module of the project
imports clu. A script or test that imports `clu.metric_writers` itself must import metapix_jax
(or call `install()`) first: without TensorFlow, clu's package imports only after it.

This module imports only the standard library: the package import stays cheap and works on a
host with only jax installed; the writer's own imports (tensorboard, Pillow) happen when clu
asks for it.
"""

import sys
import types

CLU_MODULE = "clu.metric_writers.summary_writer"
"""The clu module that imports TensorFlow; install() puts the stand-in under this name."""


def install() -> None:
    """Makes clu build `TensorBoardWriter` wherever it would build its TensorFlow writer.

    Call it before clu's `metric_writers` is imported; calling it again does nothing. If clu's
    package was imported first (possible only where TensorFlow is installed), its two references
    to the TensorFlow writer are rebound, so the outcome does not depend on import order.
    """
    if isinstance(sys.modules.get(CLU_MODULE), _StandIn):
        return
    stand_in = _StandIn(CLU_MODULE, f"Stands in for clu's TensorFlow writer; see {__name__}.")
    sys.modules[CLU_MODULE] = stand_in
    package = sys.modules.get("clu.metric_writers")
    if package is not None:
        writer = stand_in.SummaryWriter
        package.summary_writer = stand_in
        for module in (package, sys.modules.get("clu.metric_writers.utils")):
            if module is not None:
                module.SummaryWriter = writer


class _StandIn(types.ModuleType):
    """What clu finds under `clu.metric_writers.summary_writer` after install()."""

    @property
    def SummaryWriter(self) -> type:  # noqa: N802 (clu's name)
        """`TensorBoardWriter`, imported when clu first asks for it."""
        from clu.metric_writers import interface

        from metapix_jax.tensorboard_writer import TensorBoardWriter

        # A virtual subclass, so that isinstance(writer, MetricWriter) holds: a real one would
        # have to import clu's package before install() could stand in for its module.
        interface.MetricWriter.register(TensorBoardWriter)
        return TensorBoardWriter
