"""Memory, measured from /proc/self/status: a block's peak resident-set growth and a process's own peak.

VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so a child would report
its parent's peak when that is the larger."""

from __future__ import annotations

import resource
from pathlib import Path

from ..errors import LocpathError


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LocpathError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), so memory freed earlier (weight prepacking,
    the warm-up) is not silently reused inside the measured block: its growth would read near zero."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may undercount, as before
        pass


class PeakGrowth:
    """Peak resident-set growth over a block, in bytes."""

    def __enter__(self):
        self.peak_before = max(status_kb("VmHWM"), status_kb("VmRSS"))  # the reset below drops it: keep it
        _trim_heap()
        self.reset = _reset_peak()
        self.before = status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = status_kb("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.bytes = max(0, peak - self.before) * 1024


def peak_rss_mb_of(g: PeakGrowth) -> float:
    """The process's peak resident set over its life (before and since the mark was reset), MB. VmHWM, not
    ru_maxrss: Linux carries ru_maxrss across fork and exec, so a spawned child would report its parent's peak."""
    now = status_kb("VmHWM") if g.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max(now, g.peak_before) / 1024.0, 1)


def own_peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM), MB; ru_maxrss where /proc is missing."""
    try:
        return status_kb("VmHWM") / 1024.0
    except (OSError, LocpathError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
