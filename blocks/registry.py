"""Registry of block types by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Block

__all__ = ["get", "make", "names", "register"]

_B = TypeVar("_B", bound=type[Block])

_REGISTRY: dict[str, type[Block]] = {}


def register(name: str) -> Callable[[_B], _B]:
    """Class decorator that registers a :class:`Block` subclass under ``name``.

    Example:
        >>> import blocks
        >>> @blocks.register("my-block")
        ... class MyBlock(blocks.Block): ...
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"block name must be a non-empty string, got {name!r}")

    def decorator(cls: _B) -> _B:
        if not (isinstance(cls, type) and issubclass(cls, Block)):
            raise TypeError(f"only Block subclasses can be registered, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a block type named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get(name: str) -> type[Block]:
    """The block class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown block type {name!r}; registered types: {', '.join(names())}") from None


def make(name: str, **config: Any) -> Block:
    """Builds a block of the type registered under ``name``.

    Example:
        >>> import blocks
        >>> blk = blocks.make("otflow", dim=2, width=16, depth=2)
        >>> type(blk).__name__
        'OTFlowBlock'
    """
    return get(name)(**config)


def names() -> list[str]:
    """The registered block type names, sorted."""
    return sorted(_REGISTRY)
