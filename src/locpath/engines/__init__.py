"""Bundle manifests and engine building (torch-free)."""
