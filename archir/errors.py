"""archir's exception hierarchy.

Every error a user can cause derives from :class:`ArchirError`; the CLI prints its message on one
line and exits with code 2 (a traceback only with ``--debug``).
"""
from __future__ import annotations


class ArchirError(Exception):
    """Base class of the errors archir raises on purpose (bad input, broken invariants)."""


class IRError(ArchirError):
    """A graph broke one of the IR's invariants (raised by ``Graph.verify`` and the mutators)."""


class TraceError(ArchirError):
    """Neither tracer could follow the model's code.

    ``location`` is ``"file:line"`` of the user's code where tracing stopped, when known.
    """

    def __init__(self, message: str, location: str | None = None):
        super().__init__(message)
        self.location = location


class UserInputError(ArchirError):
    """A file, option or value given by the user cannot be used."""


class UntraceableInputs(TraceError, UserInputError):
    """Example inputs that are not tensors (a detector's list of images): the model cannot be
    traced whole, though a part of it that takes tensors can (``submodule=``)."""


class RunInterrupted(ArchirError):
    """A run stopped on SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint at a step boundary.

    ``exit_code`` is what the CLI exits with (128 + the signal number: 130 for SIGINT, 143 for
    SIGTERM); ``checkpoint`` is the file a ``--resume`` continues from (None when nothing could
    be saved, e.g. a run without an output directory)."""

    def __init__(self, message: str, exit_code: int, checkpoint: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


class NonFiniteLoss(ArchirError):
    """The loss (or the weights) became NaN or infinite during training (``--nan-policy stop``);
    the message names the epoch and step, and the last good checkpoint is kept."""
