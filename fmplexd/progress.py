"""Progress of long operations (loading and dequantizing backbones, deploying many tasks), told
where the person waiting looks: systemd's STATUS= (sd_notify; `systemctl status fmplexd` shows
it) and, when the stream is a terminal, one line redrawn in place (`TerminalLine`, also used by
`fmplex task deploy` for many specs). Updates are rate-limited to one per MIN_INTERVAL_S, except
the first of each stage and forced ones, so a loop of thousands of steps costs nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

MIN_INTERVAL_S = 0.25


class TerminalLine:
    """One status line redrawn in place on a terminal; silent on anything else."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._shown = False

    def draw(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._shown = True

    def end(self, text: str | None = None) -> None:
        """Leave the line (with `text`, if given) and move on to the next."""
        if text is not None:
            self.draw(text)
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class Progress:
    """progress(text) -> STATUS=text and the terminal line, at most every MIN_INTERVAL_S."""

    def __init__(self, notify: Callable[..., None], stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.notify, self.line, self.clock = notify, TerminalLine(stream), clock
        self._last, self._stage = -float("inf"), None

    def __call__(self, text: str, stage: str | None = None, force: bool = False,
                 **notify) -> None:
        """Report `text`; a new `stage` (e.g. the backbone being loaded) is always reported.
        `notify`: more sd_notify fields for this update (extend_timeout_s)."""
        now = self.clock()
        if not force and not notify and stage == self._stage and now - self._last < MIN_INTERVAL_S:
            return
        self._last, self._stage = now, stage
        self.notify(status=text, **notify)
        self.line.draw(text)

    def done(self, text: str) -> None:
        self.notify(status=text)
        self.line.end(text)
