"""moeprune's errors: one base, :class:`MoePruneError`, for everything the library refuses.

Each error names the problem in ``message`` and, where there is one, the fix in ``hint``; ``str(e)``
renders both (``"message; hint"``). Library messages name API parameters (``keep=0.7``,
``demos=...``); the command line shows them as its flags (``--keep 0.7``).

Each subclass also subclasses the built-in type the library raised before it existed, so
``except ValueError`` / ``except FileNotFoundError`` keep catching what they caught::

    MoePruneError
    ├── InvalidArgument(ValueError)     a parameter value or combination the call refuses
    ├── InvalidFile(ValueError)         an input file that is malformed, corrupt or of another format
    ├── IncompatibleError(ValueError)   inputs that are each fine but do not fit together (another model's
    │                                   pattern, an architecture or format moeprune cannot handle)
    ├── NotFound(FileNotFoundError)     a file or folder that does not exist
    ├── AlreadyExists(FileExistsError)  an output that is there already (pass ``overwrite=True``)
    └── CheckpointError(RuntimeError)   a model checkpoint that cannot be read or loaded

Anything else (a ``TypeError``, an ``AssertionError``, a plain ``RuntimeError``) is a bug, and the
command line shows its traceback. This module imports nothing from moeprune.
"""

from __future__ import annotations


class MoePruneError(Exception):
    """Something moeprune refuses or cannot do with the input it was given: ``message`` and a ``hint``."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InvalidArgument(MoePruneError, ValueError):
    """A parameter value, or a combination of parameters, that the call refuses."""


class InvalidFile(MoePruneError, ValueError):
    """An input file (profile, pattern, demos, store index, config) that is malformed, corrupt or of another format."""


class IncompatibleError(MoePruneError, ValueError):
    """Inputs that are each valid but do not fit together: a profile or pattern made for another model,
    a model architecture or checkpoint format moeprune cannot handle, a target engine that cannot load it."""


class NotFound(MoePruneError, FileNotFoundError):
    """A file or folder that does not exist."""


class AlreadyExists(MoePruneError, FileExistsError):
    """An output (file, folder, stored task) that exists already and would be overwritten."""


class CheckpointError(MoePruneError, RuntimeError):
    """A model checkpoint that cannot be read or loaded (missing, truncated or inconsistent files)."""


__all__ = ["MoePruneError", "InvalidArgument", "InvalidFile", "IncompatibleError", "NotFound", "AlreadyExists",
           "CheckpointError"]
