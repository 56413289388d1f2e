"""The slide libraries' own log lines (tifffile, tiffslide), routed to the slide being read.

tifffile logs each damaged page or tile it meets; printed raw, one truncated slide gives several unprefixed
lines. Here they are collected per slide (from the opening thread and every reader thread) and reported once,
as one `locpath` warning naming the file, when the slide is closed; an error that stops the read says it all in
its own one line, and the collected lines are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import threading

LIBRARIES = ("tifffile", "tiffslide")
_state = threading.local()
_installed = False
_lock = threading.Lock()


class _Router(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        sink = getattr(_state, "sink", None)
        msg = record.getMessage().strip().splitlines()
        text = f"{record.name}: {msg[0] if msg else ''}"[:300]
        if sink is not None:
            if text not in sink:
                sink.append(text)
        else:
            logging.getLogger("locpath").warning(text)


def install() -> None:
    """Route the libraries' warnings through locpath once per process (they would print raw otherwise)."""
    global _installed
    with _lock:
        if _installed:
            return
        for name in LIBRARIES:
            lg = logging.getLogger(name)
            lg.addHandler(_Router())
            lg.propagate = False
        _installed = True


@contextlib.contextmanager
def collecting(sink: list[str]):
    """Lines logged by the libraries in this thread go to `sink` meanwhile."""
    install()
    prev = getattr(_state, "sink", None)
    _state.sink = sink
    try:
        yield sink
    finally:
        _state.sink = prev
