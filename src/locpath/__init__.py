"""locpath: a deployment runtime for LoC-Path-style slide-level pathology multimodal LLMs."""

__version__ = "0.1.0"
