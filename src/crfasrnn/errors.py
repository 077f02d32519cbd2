"""The exceptions that mean the user's mistake or environment, not a bug: the command line prints them on one line.

Everything else (a ``TypeError`` from a bug, a ``KeyError``, an ``AssertionError``) keeps its traceback. The user's
other mistakes are ``ValueError`` (bad values, bad files: :class:`crfasrnn.weights.WeightsError`,
:class:`crfasrnn.files.OutputError`) and ``OSError`` (files that cannot be read or written).
"""

from __future__ import annotations

__all__ = ["InputTypeError", "MissingDependencyError", "TrainingDivergedError", "USER_ERRORS"]


class InputTypeError(TypeError):
    """An input of the wrong type or dtype (an argument, or what a file holds): the user's mistake, not a bug.

    Every type check of this package raises it, so that the command line can tell a wrong input (one line, exit 1)
    from a ``TypeError`` raised by a bug (a traceback). It is a ``TypeError``: ``except TypeError`` catches it.
    """


class MissingDependencyError(ImportError):
    """An optional dependency (one of the package's extras) is not installed; the message says what to install."""


class TrainingDivergedError(RuntimeError):
    """Training stopped because the loss stopped being finite; the message says at which step and what to lower."""


#: What the command line reports on one line (exit status 1) rather than with a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    InputTypeError,
    MissingDependencyError,
    TrainingDivergedError,
)
