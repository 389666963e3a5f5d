"""Installing the drop-in endpoint: ``patch_loop``, ``install``/``uninstall`` and
``loop_factory``, with the ways programs make their loops (``asyncio.run``,
``asyncio.Runner``, ``uvloop.install()`` before or after, ``uvloop.run``)."""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import udpx

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]

needs_uvloop = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")


@pytest.fixture
def clean_install() -> Iterator[None]:
    """Leave no global patch and no event loop policy behind."""
    try:
        yield
    finally:
        udpx.uninstall()
        asyncio.set_event_loop_policy(None)


async def endpoint_kind() -> tuple[bool, str]:
    """Whether the running loop is patched, and which transport its method makes."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                       local_addr=("127.0.0.1", 0))
    kind = type(transport).__name__
    transport.close()
    await asyncio.sleep(0)
    return udpx.is_patched(loop), kind


def test_patch_loop_is_idempotent_and_returns_the_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert not udpx.is_patched(loop)
        assert udpx.patch_loop(loop) is loop
        assert udpx.patch_loop(loop, batch_size=8, rx_coalesce=0) is loop
        assert udpx.is_patched(loop)

        async def main() -> None:
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
            assert isinstance(transport, udpx.EndpointTransport)
            # The options of the last patch_loop call.
            assert transport.describe()["socket"]["batch_size"] == 8
            assert transport.describe()["socket"]["rx_coalesce"] == 0
            transport.close()

        loop.run_until_complete(main())
    finally:
        loop.close()


def test_patch_loop_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="event loop"):
        udpx.patch_loop(object())  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(TypeError, match="max_conns"):
            udpx.patch_loop(loop, max_conns=3)
        with pytest.raises(ValueError, match="batch_size"):
            udpx.patch_loop(loop, batch_size=0)
        with pytest.raises(ValueError, match="rx_coalesce"):
            udpx.patch_loop(loop, rx_coalesce=-1)
        assert not udpx.is_patched(loop)
    finally:
        loop.close()


@needs_uvloop
def test_patch_loop_on_uvloop() -> None:
    loop = udpx.patch_loop(uvloop.new_event_loop())
    try:
        assert loop.run_until_complete(endpoint_kind()) == (True, "EndpointTransport")
    finally:
        loop.close()


def test_install_patches_asyncio_run(clean_install: None) -> None:
    assert asyncio.run(endpoint_kind()) == (False, "_SelectorDatagramTransport")
    udpx.install()
    assert asyncio.run(endpoint_kind()) == (True, "EndpointTransport")
    udpx.install(gso=False)  # again: only the options change
    assert asyncio.run(endpoint_kind()) == (True, "EndpointTransport")
    udpx.uninstall()
    assert asyncio.run(endpoint_kind()) == (False, "_SelectorDatagramTransport")


@needs_uvloop
def test_install_works_with_uvloop_in_either_order(clean_install: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # uvloop.install() on newer Pythons
        uvloop.install()
        udpx.install()
        assert asyncio.run(endpoint_kind()) == (True, "EndpointTransport")
        udpx.uninstall()
        asyncio.set_event_loop_policy(None)
        udpx.install()
        uvloop.install()
        assert asyncio.run(endpoint_kind()) == (True, "EndpointTransport")
    # uvloop's own runner.
    assert uvloop.run(endpoint_kind()) == (True, "EndpointTransport")
    udpx.uninstall()
    assert uvloop.run(endpoint_kind()) == (False, "UDPTransport")


@pytest.mark.parametrize("kind", ["asyncio", pytest.param("uvloop", marks=needs_uvloop)])
def test_loop_factory_for_runners(kind: str) -> None:
    base = uvloop.new_event_loop if kind == "uvloop" else None
    with asyncio.Runner(loop_factory=udpx.loop_factory(base)) as runner:
        assert runner.run(endpoint_kind()) == (True, "EndpointTransport")
    with pytest.raises(TypeError, match="base"):
        udpx.loop_factory(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rx_queue_size"):
        udpx.loop_factory(rx_queue_size=1)


def test_a_patched_loop_hands_what_udpx_cannot_serve_to_its_own_method() -> None:
    async def main() -> None:
        loop = udpx.patch_loop(asyncio.get_running_loop())
        # An argument the loop method does not know: the loop's own error, not udpx's.
        stock: Any = loop.create_datagram_endpoint
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            await stock(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), bogus=1)
        # AF_UNIX: the loop's own transport.
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                               sock=left)
            assert not isinstance(transport, udpx.EndpointTransport)
            transport.close()
            await asyncio.sleep(0)
        finally:
            right.close()

    asyncio.run(main())
