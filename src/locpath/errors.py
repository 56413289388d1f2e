"""Typed errors. The CLI prints any LocpathError as one line and exits non-zero; anything else is a bug."""


class LocpathError(Exception):
    """Base class for every error a user can cause (bad file, bad option, missing model)."""


class SlideError(LocpathError):
    """A slide file cannot be opened, read, or tiled."""


class FeatureFileError(LocpathError):
    """A per-slide feature file is missing, malformed, or inconsistent."""


class CheckpointError(LocpathError):
    """A model checkpoint directory is missing files or does not match its config."""


class ConfigError(LocpathError):
    """A configuration value is invalid."""


def warn(message: str) -> None:
    """A recoverable problem, one line: the CLI prints `locpath: warning: ...`; a service logs it."""
    import logging

    logging.getLogger("locpath").warning(message)
