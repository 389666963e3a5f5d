"""Opening: what ``listen()`` and ``dial()`` return, a coroutine that is also a context manager."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Protocol, TypeVar, final

__all__ = ["Opening"]


class _Closeable(Protocol):
    async def aclose(self) -> None: ...


T = TypeVar("T", bound=_Closeable)


@final
class Opening(Coroutine[Any, Any, T]):
    """The opening of a listener or connection: ``await`` it, pass it to
    ``asyncio.create_task()`` / ``gather()`` (it is a coroutine), or use it with ``async with``
    (which closes what it opened on exit).

    Like any coroutine it runs once: awaiting it a second time raises ``RuntimeError``. Nothing
    happens (no socket is made) until it is first awaited or started.
    """

    __slots__ = ("_coroutine", "_factory", "_opened")

    def __init__(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._factory = factory
        self._coroutine: Coroutine[Any, Any, T] | None = None
        self._opened: T | None = None

    def _started(self) -> Coroutine[Any, Any, T]:
        if self._coroutine is None:
            self._coroutine = self._factory()
        return self._coroutine

    def send(self, value: Any, /) -> Any:
        return self._started().send(value)

    def throw(self, *args: Any) -> Any:
        return self._started().throw(*args)

    def close(self) -> None:
        if self._coroutine is not None:
            self._coroutine.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._started().__await__()

    async def __aenter__(self) -> T:
        self._opened = await self
        return self._opened

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._opened is not None:
            opened, self._opened = self._opened, None
            await opened.aclose()
