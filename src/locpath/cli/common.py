"""What every command shares: the parser class, argument types, the answers' JSON and the one rule for failures
(a `LocpathError` or a failed file operation is one `locpath: error:` line and exit status 2, never a traceback)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import int_at_least


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (the rule for every bad input), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"locpath: error: {self.prog}: {message} (see {self.prog} --help)\n")


# -- argument types ---------------------------------------------------------------------------------------------
def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number: {text!r}")
    return v


def probability(text: str) -> float:
    """A number from 0 to 1 (a confidence)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1: {text!r}")
    return v


def byte_size(text: str) -> int:
    """A positive size in bytes: `123`, or with a suffix K, M, G, T (powers of 1024), e.g. `64G`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 500M, 64G): {text!r}")
    v = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return v


def jpeg_quality(text: str) -> int:
    v = non_negative_int(text)
    if not 1 <= v <= 100:
        raise argparse.ArgumentTypeError(f"must be 1-100: {text!r}")
    return v


non_negative_int = int_at_least(0)
positive_int = int_at_least(1)


def retell(parser: argparse.ArgumentParser, option: str, help: str) -> None:
    """Give a shared option (add_runtime_options) the help text that is true for this command."""
    parser._option_string_actions[option].help = help


# -- output -----------------------------------------------------------------------------------------------------
def quiet_if(json_out: bool):
    """The progress log of a command: print, or nothing when stdout carries JSON."""
    return (lambda m: None) if json_out else print


@contextlib.contextmanager
def stdout_reserved(reserve: bool):
    """With --json, stdout carries exactly one JSON document. Progress lines, Ray's raylet and some native libraries
    print to file descriptor 1 (from other threads too); while the work runs, fd 1 points at stderr, and the
    document is written to the yielded copy of the real stdout."""
    if not reserve:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as real:
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def serve_data_dir(arg: str | None) -> Path:
    """`serve` and `keys`: the service's data folder (default ~/.cache/locpath/serve)."""
    if arg:
        return Path(arg)
    from ..runtime.slide_cache import cache_root

    return cache_root() / "serve"


ANSWERS_SCHEMA = "locpath-answers/1"


def answers_json(answers: list, error: str | None = None) -> str:
    """`ask --json`: one schema for one or many questions, and for a failure (with the answers given before it)."""
    out: dict = {"schema": ANSWERS_SCHEMA, "answers": [a.to_dict() for a in answers]}
    if answers:
        out["peak_rss_mb"] = round(max(a.peak_rss_mb for a in answers), 1)
    if error is not None:
        out["error"] = error
    return json.dumps(out)


# -- failures ---------------------------------------------------------------------------------------------------
class PartialAnswers(LocpathError):
    """A failure after `answers` were given (ask, chat). With `as_json` the failure is reported as the answers
    document with its `error` (what `ask --json` promises), the answers before it included."""

    def __init__(self, message: str, answers: list, as_json: bool = False):
        super().__init__(message)
        self.answers = list(answers)
        self.as_json = as_json


def error_message(exc: BaseException) -> str:
    """The one line a LocpathError or an OSError (a file the command had to read or write) is reported as."""
    if isinstance(exc, OSError) and not isinstance(exc, LocpathError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return str(exc)


def fail(message: str, exc: BaseException | None = None) -> int:
    """One stderr line, exit 2; a PartialAnswers under --json also prints the answers document with the error."""
    message = " ".join(message.split())
    if isinstance(exc, PartialAnswers) and exc.as_json:
        print(answers_json(exc.answers, error=message), flush=True)
    print(f"locpath: error: {message}", file=sys.stderr, flush=True)
    return 2


def run_command(args: argparse.Namespace) -> int:
    """The command's exit status; every failure it may meet turned into one line."""
    try:
        return int(args.func(args) or 0)
    except LocpathError as exc:
        return fail(str(exc), exc)
    except BrokenPipeError:  # `locpath ask ... | head`: the reader left; no traceback, nothing more to stdout
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        print("locpath: error: the output pipe was closed by its reader; stopped", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command had to write or read: permission, full disk, ...
        return fail(error_message(exc))
    except KeyboardInterrupt:
        print("locpath: interrupted", file=sys.stderr)
        return 130


class _WarningLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        first = record.getMessage().strip().splitlines()
        return f"locpath: warning: {first[0] if first else ''}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (embedding programs and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """Library warnings (locpath's own and the slide libraries' routed through it) as one line each."""
    log = logging.getLogger("locpath")
    if not any(getattr(h, "_locpath_cli", False) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(_WarningLine())
        h._locpath_cli = True
        log.addHandler(h)
        log.propagate = False
        log.setLevel(logging.WARNING)
