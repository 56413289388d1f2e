"""Export of every component to ONNX, validated against PyTorch, into a versioned bundle (needs torch)."""
