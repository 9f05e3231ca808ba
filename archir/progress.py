"""Progress that fits where it is shown: a tqdm bar on a terminal, plain lines in a log.

archir's runs go to terminals, to files (``nohup``, CI, a cluster job's log) and to notebooks.
A tqdm bar redraws itself in place: in a file that is noise, and with ``disable=None`` (tqdm's
"on a terminal only") it is nothing at all, so a job log used to show no sign of life for
minutes. :class:`Progress` keeps tqdm where stderr is a terminal (tqdm's notebook widget in a
Jupyter kernel) and elsewhere writes one plain line when a loop starts, then at most one every
``interval`` seconds (``$ARCHIR_PROGRESS_INTERVAL``, default 30) and one when it ends::

    archir: arch 1/10: 120/391 steps (31%), loss 1.8342, accuracy 32.10%, lr 0.0998, 812 img/s, ETA 0:05:21

Rates are items (``items_per_step`` per step, e.g. the batch size) per second of the loop so far;
the ETA is the remaining steps at the mean step time so far.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any, Iterable, Iterator, TextIO

DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "ARCHIR_PROGRESS_INTERVAL"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = getattr(shell, "get_ipython", lambda: None)() if shell is not None else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def format_duration(seconds: float) -> str:
    """``0:05:21``: hours, minutes and seconds, rounded to the second."""
    return str(timedelta(seconds=int(round(max(seconds, 0.0)))))


class Progress:
    """Iterate ``iterable`` (``total`` steps) showing progress as described in the module
    docstring. ``enabled=False`` shows nothing. ``set_postfix`` adds the latest figures (loss,
    metric ...) to the bar or to the next line; ``update`` advances a loop that is not iterated
    through this object. ``disable`` is True when nothing is shown (skip computing figures)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, unit: str = "step", items_per_step: int | None = None,
                 item_name: str = "img", stream: TextIO | None = None, interval: float | None = None,
                 leave: bool = False):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.items_per_step, self.item_name = items_per_step, item_name
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.postfix: dict[str, str] = {}
        self.n = 0
        self._bar = None
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._closed = False
        self.disable = not enabled
        if self.disable:
            return
        if _is_terminal(self.stream) or _in_notebook():
            if _is_terminal(self.stream):
                from tqdm import tqdm
            else:
                from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                             file=self.stream)
        else:
            self._write(f"{desc}: starting" + (f", {self.total:,} {unit}s" if self.total is not None else ""))

    # -- the loop ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("Progress was built without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done; a plain line when ``interval`` seconds have passed."""
        self.n += n
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval and self.n != self.total:  # the last: close() says "done"
            self._last = now
            self._write(self.line())

    def set_postfix(self, values: dict[str, Any], refresh: bool = False) -> None:
        """The latest figures, shown after the counts (``{"loss": "1.83", ...}``)."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=refresh)

    def close(self) -> None:
        """End the bar, or write the final line of a loop that ran past one interval."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif not self.disable and self.n and time.perf_counter() - self._t0 >= self.interval:
            self._write(self.line(final=True))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the plain line ----------------------------------------------------------------------
    def line(self, final: bool = False) -> str:
        """``desc: done/total steps (pct), figures, rate, ETA`` (``done`` at the end)."""
        elapsed = time.perf_counter() - self._t0
        parts = []
        if self.total:
            parts.append(f"{self.n:,}/{self.total:,} {self.unit}s ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n:,} {self.unit}s")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        if self.n and elapsed > 0:
            if self.items_per_step:
                parts.append(f"{self.n * self.items_per_step / elapsed:,.0f} {self.item_name}/s")
            else:
                rate = self.n / elapsed
                parts.append(f"{rate:,.0f} {self.unit}s/s" if rate >= 100 else f"{rate:.2f} {self.unit}s/s")
            if final:
                parts.append(f"done in {format_duration(elapsed)}")
            elif self.total:
                parts.append(f"ETA {format_duration((self.total - self.n) * elapsed / self.n)}")
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self, text: str) -> None:
        try:
            print(f"archir: {text}", file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or full log must not stop the run
            pass


def say(line: str, enabled: bool = True) -> None:
    """One status line (``archir: ...``) to stderr, between bars: long preparations and what a
    cache will save next time."""
    if not enabled:
        return
    from tqdm import tqdm

    tqdm.write(f"archir: {line}", file=sys.stderr)
