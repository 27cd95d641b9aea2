"""Exceptions a user can cause. The CLI prints their message as one line and exits non-zero."""


class Gemma3Error(Exception):
    """Base class: bad input from the user (paths, files, configs, arguments)."""


class ConfigError(Gemma3Error):
    """A config.json that is missing, malformed or not a Gemma 3 model."""


class ModelFileError(Gemma3Error):
    """Missing, truncated or mismatched weight or tokenizer files."""


class ConversionError(Gemma3Error):
    """A checkpoint that cannot be converted."""


class TokenIdError(Gemma3Error, ValueError):
    """A token id outside the model's embedding table (it would read memory that is not the model's)."""
