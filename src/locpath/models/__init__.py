"""PyTorch definitions (training and export only; the runtime never imports this package)."""
