"""Stand-in for cuda-python (tests only): see cuda/bindings/runtime.py."""
