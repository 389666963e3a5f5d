"""Objects left unclosed warn with ResourceWarning."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

import udpx

from .conftest import LOOP_KINDS

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("what", ["listener", "dialed"])
def test_unclosed_objects_warn(kind: str, what: str) -> None:
    if kind == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop

    async def leak() -> None:
        ln = await udpx.listen("127.0.0.1", 0)
        if what == "dialed":
            await udpx.dial("127.0.0.1", ln.local_addr[1])
            await ln.aclose()

    # The socket object may be finalised first and warn too; udpx's own warning must be there.
    with pytest.warns(ResourceWarning) as record:
        loop = factory()
        try:
            loop.run_until_complete(leak())
        finally:
            loop.close()
        del loop
        for _ in range(3):
            gc.collect()
    assert any(f"unclosed <udpx.{name}" in str(w.message) for w in record
               for name in ("Listener", "UDPConn"))


def test_no_warning_when_closed() -> None:
    async def tidy() -> Any:
        async with udpx.listen("127.0.0.1", 0) as ln, udpx.dial("127.0.0.1", ln.local_addr[1]):
            pass

    asyncio.run(tidy())
    gc.collect()  # filterwarnings=error turns any ResourceWarning into a failure
