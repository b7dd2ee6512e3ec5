"""Errors a user can act on: the CLI prints them as one line and exits 2."""


class SpecbenchError(Exception):
    """Base class for user-facing errors (bad input, missing files, unusable results)."""


class UsageError(SpecbenchError):
    """Unknown method/dataset, bad option values."""


class ContextLengthError(SpecbenchError):
    """A prompt (plus the generation budget) does not fit the model's context window."""
