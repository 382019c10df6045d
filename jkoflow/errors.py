"""The exceptions jkoflow raises for bad user input and for failed training."""

from __future__ import annotations

__all__ = ["InputError", "TrainingError"]


class InputError(ValueError):
    """Bad input from the user (data, config, files, paths).

    The message is one line that says what was wrong and what is expected; the
    command line prints it and exits with status 2.

    Example:
        >>> import jkoflow
        >>> try:
        ...     jkoflow.JKOConfig(iters=0)
        ... except jkoflow.InputError as error:
        ...     print(error)
        iters must be a positive integer, got 0
    """


class TrainingError(RuntimeError):
    """Training cannot go on, e.g. the loss stayed non-finite after every retry.

    Attributes:
        block_index: Index of the block whose training failed; the blocks
            before it are finished.

    Example:
        >>> import jkoflow
        >>> error = jkoflow.TrainingError("block 3: the loss stayed NaN", block_index=2)
        >>> error.block_index, isinstance(error, RuntimeError)
        (2, True)
    """

    def __init__(self, message: str, block_index: int) -> None:
        super().__init__(message)
        self.block_index = block_index
