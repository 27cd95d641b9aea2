"""The `gemma3` command line: thin wrappers over the Python API."""
