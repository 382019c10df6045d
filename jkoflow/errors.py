"""The exception raised for bad user input."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from the user (data, config, files, paths).

    The message is one line that says what was wrong and what is expected; the
    command line prints it and exits with status 2.
    """
