"""The shipped trained checkpoints (reference LoC-Path model and prefix baseline) and the reference model's
prebuilt bundle, so a runtime-only install runs `locpath demo` without torch. Torch-free lookup."""

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent


def shipped_checkpoint(name: str = "reference") -> Path:
    return SHIPPED / name


def shipped_bundle(name: str = "reference") -> Path:
    """The bundle `locpath export` makes of the shipped checkpoint (fp32, with the fused decoder)."""
    return SHIPPED / "bundles" / name
