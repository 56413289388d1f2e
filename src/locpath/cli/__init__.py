"""The `locpath` command. User errors print one line and exit 2; nothing half-written is left behind.

One module per command, each with `register(subparsers)` (its options, beside its code) and `run(args) -> int`;
`common` holds what they share. Heavy imports stay inside `run`: `locpath --help` never loads torch or ONNX Runtime.
"""

from __future__ import annotations

import argparse

from . import ask, batch, bench, build, calibrate, chat, demo, encoders, export, import_, keygen, keys, serve, sign
from . import eval as eval_
from . import inspect as inspect_
from . import synth, tiles, train, trust, verify
from .common import Parser, run_command, setup_logging

# in the order `locpath --help` lists them
COMMANDS = (tiles, encoders, synth, train, eval_, trust, export, inspect_, import_, ask, chat, calibrate, build, bench, demo,
            verify, sign, serve, batch, keys, keygen)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="locpath", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_command(args)
