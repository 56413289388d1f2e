"""One bench suite: the flag that turns it on, what it measures, where its section goes in the report, and the
ratios and targets it reads back from the report. `run_bench` walks `suites.SUITES` in order; a new suite is one
module in bench/suites/ and one line in that list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import BenchConfig


class Skip(Exception):
    """Raised by a suite's `run` when it cannot run here: the reason goes to `skipped[suite.name]`."""


@dataclass
class Context:
    """What every suite may use: the config, the bench bundle's Pipeline (slide cache off), the report so far
    (suites run in registry order, so a later one may read an earlier one's section), the stages slide."""

    cfg: BenchConfig
    pipe: object
    report: dict
    torch: str | None  # torch's version when installed (not imported: the runtime's own peak RSS comes first)
    slide: Path
    log: Callable[[str], None]

    @property
    def baselines(self) -> bool:
        """The PyTorch and prefix baselines run: asked for and torch installed."""
        return bool(self.cfg.baselines and self.torch)

    def skip(self, name: str, reason: str) -> None:
        self.report["skipped"][name] = reason


def _none(report: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Suite:
    name: str  # its `skipped` key when it does not run
    section: str  # dotted path of its section in the report; "" merges the dict run returns into the top level
    run: Callable[[Context], object]
    flag: str | None = None  # the BenchConfig field that turns it on (None: it always runs)
    needs_torch: bool = False
    off: str | None = None  # `skipped` reason when its flag is off or torch is missing (None: say nothing)
    ratios: Callable[[dict], dict] = _none  # report -> name -> value (>1: locpath / LoC-Path ahead)
    targets: Callable[[dict], dict] = _none  # report (its ratios in) -> name -> {target, value, met, ...}

    def enabled(self, ctx: Context) -> bool:
        return (self.flag is None or bool(getattr(ctx.cfg, self.flag))) and (not self.needs_torch or bool(ctx.torch))
