"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a non-empty output directory, a checkpoint that
does not match the model) raises a subclass of :class:`UserError`. Command-line entry points catch exactly this
class and print its message as one line with a non-zero exit; every other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message names what was wrong and what to do about it."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or combination of values."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user pointed at does not exist or is incomplete."""


class OutputExistsError(UserError, FileExistsError):
    """Refusing to overwrite existing output."""


class CheckpointError(UserError, ValueError):
    """A checkpoint with missing, unexpected or wrongly shaped tensors, or from a different model."""


class UnsupportedModelError(UserError, ValueError):
    """A model architecture or feature this project does not implement."""


class TrainingHalted(UserError):
    """The run stopped itself after saving a checkpoint (repeated NaN steps, an engine that keeps failing)."""
