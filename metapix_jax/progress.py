"""Progress lines: steps/s per kind of step and an ETA for the rest of the schedule.

clu's `periodic_actions.ReportProgress` assumes that every step costs the same; here a
meta step costs several joint steps, so the speed is measured per phase kind and the ETA
sums each remaining phase's steps at its own kind's speed (the slowest known speed for a
kind not seen yet).
"""

import time

import numpy as np

from metapix_jax import schedule

LINE_WIDTH = 100  # Progress lines fit this many columns.
# The metrics a progress line shows, by the name it shows them under (all go to TensorBoard).
SHOWN = {"loss": "loss", "meta_target_loss": "target", "hrselect_l2": "l2", "weight_mean": "w"}


def progress_line(phase, position: int, summary: dict, rate: float, eta: str) -> str:
    """'meta_gen1 100/200 @700 target 0.3677 w 0.665 7.7/s ETA 1:30': the phase's step
    count, the schedule position, a few metrics, the speed and the time left."""
    shown = " ".join(f"{SHOWN[k]} {summary[k]:.4g}" for k in SHOWN if k in summary)
    skipped = f" skip {int(summary['nonfinite'])}" if summary.get("nonfinite") else ""
    speed = f"{rate:.1f}/s " if np.isfinite(rate) else ""
    return (
        f"{phase.name} {position - phase.start}/{phase.length} @{position} "
        f"{shown}{skipped} {speed}ETA {eta}"
    )


class Progress:
    """Steps/s per step kind and an ETA for the rest of the schedule."""

    def __init__(self, plan: list[schedule.Phase]):
        self.plan = plan
        self.total = plan[-1].end if plan else 0
        self.seconds_per_step: dict[str, float] = {}
        self.mark: tuple[int, float] | None = None

    def restart(self, position: int) -> None:
        """Starts timing after a compilation or an evaluation, which are not steps."""
        self.mark = (position, time.perf_counter())

    def update(self, kind: str, position: int) -> float:
        """Records the speed since the last mark; returns steps/s."""
        if self.mark is None or position <= self.mark[0]:
            return float("nan")
        steps, seconds = position - self.mark[0], time.perf_counter() - self.mark[1]
        self.seconds_per_step[kind] = seconds / steps
        self.restart(position)
        return steps / seconds

    def eta_seconds(self, position: int) -> float:
        known = self.seconds_per_step
        fallback = max(known.values()) if known else float("nan")
        return sum(
            max(0, p.end - max(position, p.start)) * known.get(p.kind, fallback) for p in self.plan
        )


def format_seconds(seconds: float) -> str:
    """h:mm:ss (or m:ss), '?' when unknown."""
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
