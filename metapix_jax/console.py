"""What a run prints: one tagged line per stage, and a bar for long stages.

Everything goes to stdout from process 0 of a multi-process run only, so that N hosts do
not print N copies. Long stages (writing the benchmark) show a bar that redraws in place on
a terminal, and a line every quarter when stdout is a file or a pipe (logs stay readable).
"""

import sys
import time

import jax


def say(tag: str, message: str) -> None:
    """`[tag] message` on stdout, from process 0 of a multi-process run only."""
    if jax.process_index() == 0:
        print(f"[{tag}] {message}", flush=True)


class Bar:
    """`[tag] what: [#####.....] done/total (m:ss)`, updated as work completes."""

    WIDTH = 30

    def __init__(self, tag: str, what: str, total: int):
        self.tag, self.what, self.total = tag, what, total
        self.start = time.perf_counter()
        self.terminal = sys.stdout.isatty()
        self.shown_quarter = -1

    def __call__(self, done: int) -> None:
        if jax.process_index() != 0:
            return
        if self.terminal:
            end = "\n" if done >= self.total else ""
            print(f"\r{self._line(done)}", end=end, flush=True)
        elif (quarter := 4 * done // max(self.total, 1)) > self.shown_quarter:
            self.shown_quarter = quarter
            print(self._line(done), flush=True)

    def _line(self, done: int) -> str:
        filled = self.WIDTH * done // max(self.total, 1)
        seconds = int(time.perf_counter() - self.start)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return (
            f"[{self.tag}] {self.what}: [{bar}] {done}/{self.total} "
            f"({seconds // 60}:{seconds % 60:02d})"
        )
