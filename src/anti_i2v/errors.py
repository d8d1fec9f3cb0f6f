"""One exception family for everything a user can get wrong.

Every message says what to do next; the CLI prints it on one line without a
traceback and exits with a non-zero code.
"""

from __future__ import annotations


class AntiI2VError(Exception):
    """Base class of every error anti-i2v raises on purpose."""

    exit_code: int = 1


class InputError(AntiI2VError):
    """A photo (or other input file) is missing, unreadable or unusable."""

    exit_code = 2


class ConfigError(AntiI2VError):
    """A configuration value is out of range or inconsistent."""

    exit_code = 2


class ModelError(AntiI2VError):
    """A model name is unknown or its weights cannot be found or loaded."""

    exit_code = 3


class OutputError(AntiI2VError):
    """The output cannot be written (unwritable folder, would overwrite the input)."""

    exit_code = 4


class OutOfMemory(AntiI2VError):
    """The accelerator ran out of memory; the message names the memory mode that would fit."""

    exit_code = 5
