"""The shipped trained checkpoints (reference LoC-Path model and prefix baseline). Torch-free lookup."""

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent


def shipped_checkpoint(name: str = "reference") -> Path:
    return SHIPPED / name
