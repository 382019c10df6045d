"""Registry of block types by name: how configs and checkpoints name a block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from .base import Block

__all__ = ["get", "make", "names", "register", "spec"]

_B = TypeVar("_B", bound=type[Block])

_REGISTRY: dict[str, type[Block]] = {}


@overload
def register(name: str) -> Callable[[_B], _B]: ...
@overload
def register(name: str, cls: _B) -> _B: ...
def register(name: str, cls: _B | None = None) -> Callable[[_B], _B] | _B:
    """Registers a :class:`Block` subclass under ``name``: as a class decorator,
    ``@register(name)``, or directly, ``register(name, cls)``.

    A name stays bound to its class; registering it again is allowed only for
    a redefinition of the same class (same module and qualified name, e.g. a
    re-run notebook cell), which replaces it.

    Example:
        >>> import blocks
        >>> @blocks.register("my-block")
        ... class MyBlock(blocks.Block): ...
        >>> blocks.get("my-block") is MyBlock
        True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"block name must be a non-empty string, got {name!r}")

    def decorator(cls: _B) -> _B:
        if not (isinstance(cls, type) and issubclass(cls, Block)):
            raise TypeError(f"only Block subclasses can be registered, got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"a block type named {name!r} is already registered ({old.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator if cls is None else decorator(cls)


def get(name: str) -> type[Block]:
    """The block class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown block type {name!r}: register it (import the code that calls "
            f"blocks.register({name!r})) first; registered types: {', '.join(names())}"
        ) from None


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


def spec(block: Block) -> dict[str, Any]:
    """``{"type": name, "config": block.config()}``, the JSON-able description
    that :func:`make` rebuilds the block from; ValueError unless the block's
    class itself is registered (a subclass inherits its parent's ``name``).

    Example:
        >>> import blocks
        >>> blocks.spec(blocks.make("otflow", dim=2, width=4, depth=1))
        {'type': 'otflow', 'config': {'dim': 2, 'width': 4, 'depth': 1, 'rank': 3}}
    """
    cls = type(block)
    if _REGISTRY.get(cls.name) is not cls:
        raise ValueError(
            f"block type {cls.__qualname__} is not registered; "
            "register it with @blocks.register(name) to save or describe it"
        )
    return {"type": cls.name, "config": block.config()}
