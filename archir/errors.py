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
