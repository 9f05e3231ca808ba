"""The process's anonymous resident memory (``RssAnon`` in ``/proc/self/status``: tensors, not
mapped files) and its peak per phase, sampled in a thread, for the benchmark scripts (Linux; where
``/proc`` is not there the figures are None)."""
from __future__ import annotations

import sys
import threading


def rss_anon() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None


class PeakMemory:
    """Samples :func:`rss_anon` every ``interval`` seconds from construction to :meth:`stop`:
    ``start`` (at construction), ``peak`` and ``peaks`` (``{phase: peak}``, the phase being
    whatever ``phase`` says while it runs). ``announce=True`` prints a line on stderr for each
    further GiB reached (where a run that is then killed for memory was)."""

    def __init__(self, phase: str = "start", *, interval: float = 0.01, announce: bool = False):
        self.start = self.peak = rss_anon()
        self.phase, self.peaks = phase, {}
        self._interval, self._announce = interval, announce
        self._done = threading.Event()
        if self.start is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        shown = self.start
        while not self._done.wait(self._interval):
            now, phase = rss_anon() or 0, self.phase
            self.peak = max(self.peak, now)
            self.peaks[phase] = max(self.peaks.get(phase, 0), now)
            if self._announce and now - shown >= 2**30:
                shown = now
                print(f"  memory: {(now - self.start) / 2**30:.0f} GiB above the start, in {phase}",
                      file=sys.stderr, flush=True)

    def stop(self) -> int | None:
        """Stop sampling; the peak above ``start`` in bytes (None without ``/proc``)."""
        self._done.set()
        return None if self.start is None else max(self.peak - self.start, 0)
