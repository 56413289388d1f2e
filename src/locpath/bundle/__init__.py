"""The bundle format, at the bottom of the package (torch-free, imports nothing of locpath's above it): the manifest
dataclasses and their validation, component names, the decoder I/O contract, the path policy, checksums and
signatures, and engine configs with their checks."""
