"""Fitting and measuring the trust numbers of a bundle (runtime/trust.py reads them): `fit` writes trust.json from
synthetic training and validation slides; `oodset` builds the out-of-distribution slides; `report` measures
calibration and the OOD detector (`locpath eval --trust`). Torch-free: it drives the runtime as users do."""
