"""Calibration sets drawn from slides for quantization (torch-free)."""
