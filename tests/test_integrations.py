"""Third-party asyncio UDP code on patched loops, unchanged: aioquic (a QUIC client and server)
and anyio's UDP sockets, on asyncio and uvloop. Both packages are in the ``test`` extra, so CI
runs these tests; they are never skipped for want of them."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import random
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import udpx

from .conftest import TEST_TIMEOUT

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")


def run_patched(loop_kind: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a loop of the kind under test, patched by ``udpx.loop_factory``."""
    base = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=udpx.loop_factory(base)) as runner:
        assert udpx.is_patched(runner.get_loop())
        return runner.run(asyncio.wait_for(coro, TEST_TIMEOUT))


# -- aioquic ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for "localhost", made for this run."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("quic")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


#: The bulk stream's size and content (checked by digest at the client).
BULK = 10 * 2**20
BULK_DATA = random.Random(7).randbytes(BULK)


def _handle_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server's streams: "GET" answers the bulk data, anything else is echoed reversed."""

    async def serve_stream() -> None:
        request = await reader.read()
        if request == b"GET":
            for start in range(0, BULK, 64 * 1024):
                writer.write(BULK_DATA[start:start + 64 * 1024])
                await writer.drain()
        else:
            writer.write(request[::-1])
        writer.write_eof()

    asyncio.get_running_loop().create_task(serve_stream())


async def _request(client: QuicConnectionProtocol, payload: bytes) -> bytes:
    reader, writer = await client.create_stream()
    writer.write(payload)
    writer.write_eof()
    return await reader.read()


def test_aioquic_client_and_server_on_patched_loops(loop_kind: str,
                                                    certificate: tuple[Path, Path]) -> None:
    if loop_kind == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    cert_path, key_path = certificate

    async def main() -> None:
        server_config = QuicConfiguration(is_client=False, alpn_protocols=["udpx-test"])
        server_config.load_cert_chain(cert_path, key_path)
        client_config = QuicConfiguration(is_client=True, alpn_protocols=["udpx-test"],
                                          verify_mode=ssl.CERT_NONE)
        server = await serve("127.0.0.1", 0, configuration=server_config,
                             stream_handler=_handle_stream)
        try:
            server_transport = server._transport
            assert isinstance(server_transport, udpx.EndpointTransport)
            port = server_transport.get_extra_info("sockname")[1]
            async with connect("127.0.0.1", port, configuration=client_config,
                               wait_connected=True) as client:
                assert isinstance(client._transport, udpx.EndpointTransport)
                small = [_request(client, b"stream %d" % index) for index in range(5)]
                bulk = _request(client, b"GET")
                replies = await asyncio.gather(bulk, *small)
                assert len(replies[0]) == BULK
                assert (hashlib.sha256(replies[0]).digest()
                        == hashlib.sha256(BULK_DATA).digest())
                assert replies[1:] == [(b"stream %d" % index)[::-1] for index in range(5)]
                client_stats = client._transport.stats
            stats = server_transport.stats
            # The bulk went through udpx's engine, batched: at least 10 MB in 1,200-byte-ish
            # datagrams, none dropped by udpx.
            assert stats.tx_bytes >= BULK
            assert client_stats.rx_bytes >= BULK
            assert sum(stats.drops.values()) - stats.drops["kernel"] == 0
            assert server_transport._writer.gso_sends > 0
        finally:
            server.close()

    run_patched(loop_kind, main())


# -- anyio --------------------------------------------------------------------------------------

def test_anyio_udp_sockets_on_a_patched_loop(loop_kind: str) -> None:
    if loop_kind == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")

    async def main() -> None:
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as server:
            assert isinstance(server._transport, udpx.EndpointTransport)  # type: ignore[attr-defined]
            port = server.extra(anyio.abc.SocketAttribute.local_port)
            async with await anyio.create_connected_udp_socket(
                    "127.0.0.1", port, local_host="127.0.0.1") as client:
                assert isinstance(client._transport,  # type: ignore[attr-defined]
                                  udpx.EndpointTransport)
                client_port = client.extra(anyio.abc.SocketAttribute.local_port)
                for index in range(20):
                    await client.send(b"ping %d" % index)
                for index in range(20):
                    data, (host, source_port) = await server.receive()
                    assert (data, host, source_port) == (b"ping %d" % index, "127.0.0.1",
                                                         client_port)
                    await server.sendto(data.upper(), host, source_port)
                assert [await client.receive() for _ in range(20)] == [
                    b"PING %d" % index for index in range(20)]

                # A receive cancelled by its scope leaves the socket usable.
                with anyio.move_on_after(0.05) as scope:
                    await client.receive()
                assert scope.cancelled_caught
                await server.sendto(b"after", "127.0.0.1", client_port)
                assert await client.receive() == b"after"

                # Closing while another task waits in receive(): that task is told.
                outcome: list[BaseException] = []
                waiting = anyio.Event()

                async def receiver() -> None:
                    waiting.set()
                    try:
                        await server.receive()
                    except BaseException as exc:
                        outcome.append(exc)

                async with anyio.create_task_group() as group:
                    group.start_soon(receiver)
                    await waiting.wait()
                    await anyio.sleep(0)  # (let it reach the wait inside receive())
                    await server.aclose()
                assert len(outcome) == 1
                assert isinstance(outcome[0], (anyio.ClosedResourceError,
                                               anyio.BrokenResourceError))

                # A task group cancelled while its task waits on the socket.
                async with anyio.create_task_group() as group:
                    group.start_soon(client.receive)
                    await anyio.sleep(0)
                    group.cancel_scope.cancel()
                await client.send(b"still open")

    run_patched(loop_kind, main())
