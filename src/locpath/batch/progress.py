"""Progress of a batch: slides done / total, slides per hour, failures; a tqdm bar on a terminal, else one line per
slide (what a log collector keeps)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts and rate of one run."""

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.skipped, self.failed = total, 0, 0, []
        self.t0 = time.perf_counter()
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="slide", desc="batch", file=sys.stderr)
        self.show = show

    def rate(self) -> float:
        hours = (time.perf_counter() - self.t0) / 3600
        return self.done / hours if hours > 0 else 0.0

    def update(self, row: dict) -> None:
        if row["status"] == "done":
            self.done += 1
        elif row["status"] == "skipped":
            self.skipped += 1
        else:
            self.failed.append(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(slides_per_hour=f"{self.rate():.0f}", failed=len(self.failed))
        elif self.show:
            n = self.done + self.skipped + len(self.failed)
            what = row["status"] + (f": {row['error']}" if row["error"] else f" ({row['seconds']:.1f} s)")
            print(f"batch: {n}/{self.total} {row['slide']} {what}; {self.rate():.0f} slides/hour", file=sys.stderr,
                  flush=True)

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.t0
        return {"slides": self.total, "done": self.done, "skipped": self.skipped, "failed": len(self.failed),
                "seconds": round(seconds, 2), "slides_per_hour": round(self.done / (seconds / 3600), 1) if self.done else 0.0,
                "failures": [{"slide": r["slide"], "error": r["error"]} for r in self.failed]}
