"""Errors of bad input, and one-line descriptions of the errors libraries raise on it.

The command line prints a :class:`HarnessError` as one line, ``tokenmerge: error: ...``, and exits with status 2;
:func:`describe` turns an exception raised by diffusers, transformers or torch (a model that cannot be loaded, a file
that cannot be read) into such a line.
"""

from __future__ import annotations

import re

#: Sentences of library messages that point at a traceback the command line does not show.
_TRACEBACK_POINTER = re.compile(r"\s*[^.(]*\b(?:stack ?trace|traceback)\b[^.]*\.?", re.IGNORECASE)


class HarnessError(Exception):
    """A user error (bad input) of the command line and the harness: an unknown name, a value out of range, a file
    or model that cannot be read, an output folder that cannot be written."""


def _first_line(exc: BaseException) -> str:
    text = _TRACEBACK_POINTER.sub("", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _origin(exc: BaseException) -> BaseException | None:
    """The error ``exc`` was raised from, as a traceback would show it."""
    return exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


def describe(exc: BaseException) -> str:
    """``exc``'s message as one line, without pointers to a traceback, followed by the first line of the error it
    was raised from (the root of its ``__cause__`` / ``__context__`` chain) when that says something else."""
    root, seen = exc, {id(exc)}
    while (nxt := _origin(root)) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(nxt))
    head, cause = _first_line(exc), _first_line(root)
    return head if root is exc or cause in head else f"{head} (cause: {cause})"
