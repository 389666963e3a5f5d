"""Installing the drop-in endpoint: one loop, every loop, or the loops a runner makes.

- ``patch_loop(loop)`` sets udpx's ``create_datagram_endpoint`` on that loop object;
- ``install()`` sets it on the loop classes (asyncio's ``BaseEventLoop`` and, when uvloop is
  installed, ``uvloop.Loop``), so every loop gets it however it is made: ``asyncio.run``,
  ``uvloop.install()`` before or after, ``uvloop.run``;
- ``loop_factory(base)`` makes patched loops for ``asyncio.Runner(loop_factory=...)``.

The loop's own method stays reachable for what udpx does not serve (``_endpoint``'s fallback):
it is looked up on the class, past udpx's patch, never saved per loop.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from types import MethodType
from typing import Any

from ._endpoint import endpoint_options, open_endpoint
from ._options import Options

__all__ = ["install", "is_patched", "loop_factory", "patch_loop", "uninstall"]

_NAME = "create_datagram_endpoint"
#: The loop method's own keyword arguments (a loop that takes more, such as uvloop's
#: ``reuse_address``, gets those calls itself).
_LOOP_ARGUMENTS = frozenset({"family", "proto", "flags", "reuse_port", "allow_broadcast",
                             "sock"})
#: Where a loop object keeps the options patch_loop() gave it.
_OPTIONS_ATTR = "_udpx_endpoint_options"

#: Classes install() patched: the method each had before (its own or inherited), and whether
#: it was its own (restored by uninstall) or inherited (the patch is deleted).
_stock: dict[type, Any] = {}
_own: dict[type, bool] = {}
#: The options install() was given (one slot: replaced, never rebound).
_installed: list[Options] = [Options()]


def _stock_function(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop class's own create_datagram_endpoint (a function taking the loop first)."""
    for cls in type(loop).__mro__:
        if cls in _stock:
            return _stock[cls]
        if _NAME in cls.__dict__:
            return cls.__dict__[_NAME]
    raise AttributeError(f"{type(loop).__name__} has no {_NAME}")  # pragma: no cover


async def _create(loop: asyncio.AbstractEventLoop, options: Options,
                  protocol_factory: Callable[[], asyncio.BaseProtocol],
                  local_addr: Any = None, remote_addr: Any = None,
                  **kwargs: Any) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    stock = MethodType(_stock_function(loop), loop)
    if not set(kwargs) <= _LOOP_ARGUMENTS:
        # An argument of this loop's own (or a mistake it will name): its method answers.
        result: tuple[asyncio.BaseTransport, asyncio.BaseProtocol] = await stock(
            protocol_factory, local_addr, remote_addr, **kwargs)
        return result
    return await open_endpoint(
        loop, stock, protocol_factory, local_addr, remote_addr,
        family=kwargs.get("family", 0), proto=kwargs.get("proto", 0),
        flags=kwargs.get("flags", 0), reuse_port=kwargs.get("reuse_port"),
        allow_broadcast=kwargs.get("allow_broadcast"), sock=kwargs.get("sock"),
        options=options)


async def _patched_method(self: asyncio.AbstractEventLoop,
                          protocol_factory: Callable[[], asyncio.BaseProtocol],
                          local_addr: Any = None, remote_addr: Any = None,
                          **kwargs: Any) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """The loop's ``create_datagram_endpoint``, served by udpx (see
    ``udpx.create_datagram_endpoint``)."""
    options = getattr(self, _OPTIONS_ATTR, None) or _installed[0]
    return await _create(self, options, protocol_factory, local_addr, remote_addr, **kwargs)


def patch_loop(loop: asyncio.AbstractEventLoop, **options: Any) -> asyncio.AbstractEventLoop:
    """Make ``loop.create_datagram_endpoint`` udpx's, with ``options`` (udpx's endpoint
    options: ``batch_size``, ``max_datagram``, ``tx_queue_size``, ``rcvbuf``, ``sndbuf``,
    ``gso``, ``gro``, ``rx_coalesce``). Idempotent: patching again only replaces the options.
    Returns ``loop``.

    Raises:
        TypeError: ``loop`` is not an event loop, or an option is unknown.
        ValueError: an option's value is invalid.
    """
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"patch_loop() needs an event loop, got {loop!r}")
    checked = endpoint_options(options)
    try:
        setattr(loop, _OPTIONS_ATTR, checked)
        setattr(loop, _NAME, MethodType(_patched_method, loop))
    except AttributeError as exc:
        raise TypeError(f"{type(loop).__name__} objects cannot be patched (no instance "
                        f"attributes); use udpx.install() or udpx.create_datagram_endpoint()"
                        ) from exc
    return loop


def is_patched(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop.create_datagram_endpoint`` is udpx's."""
    method = getattr(loop, _NAME, None)
    return getattr(method, "__func__", None) is _patched_method


def _loop_classes() -> list[type]:
    classes: list[type] = [asyncio.BaseEventLoop]
    try:
        uvloop = importlib.import_module("uvloop")  # optional: patched when installed
    except ImportError:
        return classes
    classes.append(uvloop.Loop)
    return classes


def install(**options: Any) -> None:
    """Make every event loop's ``create_datagram_endpoint`` udpx's: asyncio's loops and
    uvloop's, however they are made (``asyncio.run``, ``uvloop.install()`` before or after
    this, ``uvloop.run``), including loops that already exist. ``options`` as for
    ``patch_loop``; calling again replaces them. ``uninstall()`` undoes it.

    Raises:
        TypeError: an option is unknown.
        ValueError: an option's value is invalid.
    """
    _installed[0] = endpoint_options(options)
    for cls in _loop_classes():
        if cls not in _stock:
            _own[cls] = _NAME in cls.__dict__
            _stock[cls] = getattr(cls, _NAME)
            setattr(cls, _NAME, _patched_method)


def uninstall() -> None:
    """Undo ``install()`` (loops patched one by one with ``patch_loop`` stay patched)."""
    for cls, original in list(_stock.items()):
        if cls.__dict__.get(_NAME) is _patched_method:
            if _own.pop(cls):
                setattr(cls, _NAME, original)
            else:
                delattr(cls, _NAME)
        del _stock[cls]
    _installed[0] = Options()


def loop_factory(base: Callable[[], asyncio.AbstractEventLoop] | None = None,
                 **options: Any) -> Callable[[], asyncio.AbstractEventLoop]:
    """A loop factory for ``asyncio.Runner(loop_factory=...)`` (and ``asyncio.run(...,
    loop_factory=...)`` on Python 3.12+): each loop ``base()`` makes (default:
    ``asyncio.new_event_loop``), patched with ``options`` (see ``patch_loop``).

    Raises:
        TypeError: ``base`` is not callable, or an option is unknown.
        ValueError: an option's value is invalid.
    """
    if base is not None and not callable(base):
        raise TypeError(f"base must be a loop factory (callable), got {base!r}")
    make = base if base is not None else asyncio.new_event_loop
    endpoint_options(options)

    def new_loop() -> asyncio.AbstractEventLoop:
        return patch_loop(make(), **options)

    return new_loop

