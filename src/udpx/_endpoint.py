"""The drop-in datagram endpoint: ``loop.create_datagram_endpoint`` with udpx's engine.

``create_datagram_endpoint(protocol_factory, ...)`` has the event loop method's signature and
semantics and returns ``(transport, protocol)``, so that code written for asyncio's
``DatagramProtocol`` (aioquic, anyio, aioice, dnspython...) gets batched receives, batched
and GSO sends without a change. It is the socket engine of ``listen()``/``dial()`` with a third
sink: the transport itself, which hands every datagram of a batch straight to the protocol's
``datagram_received(data, addr)``.

What it keeps of the asyncio contract, and where it differs on purpose:

- ``connection_made`` is scheduled with ``call_soon`` and has run before the coroutine
  returns; reading starts after it.
- ``sendto`` queues; the socket's writer drains the queue once per loop iteration (at the end
  of a reader wake-up, or from ``call_soon``) with sendmmsg, and a run of equal-size
  datagrams to one peer (a QUIC burst) leaves as one GSO send. Mutable buffers are copied at
  the call. Zero-length datagrams are sent (asyncio before 3.12 and uvloop skip them).
- An address that would need a DNS lookup raises ``ValueError`` at the call (uvloop does the
  same; asyncio blocks the loop on the lookup). ``sendto`` without an address on an
  unconnected endpoint raises ``ValueError`` (asyncio fails the transport, uvloop reports
  ``EDESTADDRREQ``).
- The write buffer is bounded twice: by bytes (``set_write_buffer_limits``; above the high
  mark the queue is drained at once, and the protocol is paused only if the kernel did not
  take it, which is when asyncio pauses) and by datagrams (``tx_queue_size``; a datagram
  beyond it is dropped, counted as ``tx_queue_full`` and reported to ``error_received`` as
  ``ENOBUFS``, where asyncio would buffer without bound).
- Kernel refusals of a send reach ``error_received``; so do ICMP errors on a connected
  endpoint. An exception raised by ``datagram_received`` goes to the loop's exception handler
  and the next datagram is delivered, as on asyncio's loop (uvloop closes the transport).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import sys
import warnings
from asyncio import trsock
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from itertools import repeat
from struct import error as struct_error
from typing import Any, final

from ._engine import SocketEngine, loop_batches
from ._options import DEFAULTS, Options
from ._queue import TxAccount
from ._sockets import (
    Address,
    PeerKey,
    address_from_key,
    max_payload,
    set_buffers,
    sockaddr_from_address,
)
from ._stats import ConnStats, drops_mapping, ecn_mapping

__all__ = ["ENDPOINT_OPTIONS", "EndpointTransport", "create_datagram_endpoint"]

logger = logging.getLogger("udpx")

#: The udpx options an endpoint takes (the others are about connections and listeners).
ENDPOINT_OPTIONS = frozenset({"batch_size", "max_datagram", "tx_queue_size", "rcvbuf",
                              "sndbuf", "gso", "gro", "rx_coalesce"})

#: Peer address tuples (receive side) and destination accounts (send side) remembered per
#: endpoint. Building one costs about a microsecond; a server with more active peers than this
#: pays it again after the table is cleared, never more than once per datagram.
_CACHE_SIZE = 65536

#: asyncio's defaults for the write buffer's marks (transports._FlowControlMixin).
_HIGH_WATER = 64 * 1024

#: Warn about sends on a closed endpoint from this many on (asyncio's threshold).
_LOG_CLOSED_SENDS = 5


class _Addresses(dict[PeerKey, Address]):
    """Peer key → the address tuple the loop would report: built on a miss, once per peer."""

    __slots__ = ("family",)

    def __init__(self, family: int) -> None:
        super().__init__()
        self.family = family

    def __missing__(self, key: PeerKey) -> Address:
        if len(self) >= _CACHE_SIZE:
            self.clear()
        address = self[key] = address_from_key(self.family, key)
        return address


def _own_bytes(data: object) -> bytes:
    """``data`` (not exactly ``bytes``) as a ``bytes`` object: a copy (the caller may reuse a
    buffer; a ``bytes`` subclass becomes plain ``bytes``). The types asyncio's transports
    take."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data argument must be a bytes-like object, not "
                    f"{type(data).__name__!r}")


def _sockaddr(family: int, address: object) -> bytes:
    """The raw destination of ``address`` as ``sendto`` takes it, without any DNS lookup.

    Raises:
        TypeError: ``address`` is not a tuple.
        ValueError: it is malformed, of the other family, or needs a DNS lookup.
    """
    if not isinstance(address, tuple):
        raise TypeError(f"address must be a tuple, got {address!r}")
    expected = (2,) if family == socket.AF_INET else (2, 4)
    if len(address) not in expected or not isinstance(address[0], str) or not (
            isinstance(address[1], int) and not isinstance(address[1], bool)
            and 0 <= address[1] <= 65535):
        shape = "(host, port)" if family == socket.AF_INET else (
            "(host, port) or (host, port, flowinfo, scope_id)")
        raise ValueError(f"invalid address {address!r}: expected {shape} with a numeric "
                         f"host and a port from 0 to 65535")
    host = address[0]
    if family == socket.AF_INET and host == "<broadcast>":
        address = ("255.255.255.255", address[1])
    try:
        if family == socket.AF_INET6 and "%" in host:
            info: tuple[Any, ...] = socket.getaddrinfo(
                host, address[1], socket.AF_INET6, socket.SOCK_DGRAM, 0,
                socket.AI_NUMERICHOST)[0][4]
            address = (info[0], info[1], 0, info[3])
        return sockaddr_from_address(family, address)
    except (OSError, UnicodeError, struct_error) as exc:
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ValueError(f"invalid address {address!r}: not a numeric {kind} address of this "
                         f"socket's family (udpx does no DNS lookup in sendto)") from exc


@final
class EndpointTransport(asyncio.DatagramTransport):
    """The transport ``udpx.create_datagram_endpoint`` returns: an ``asyncio.DatagramTransport``
    over udpx's batch engine, and the engine's sink.

    Beyond the asyncio contract it has ``stats`` and ``describe()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.BaseProtocol, options: Options,
                 remote: Address | None) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._family = family = sock.family
        self._protocol = protocol
        self._received: Callable[[bytes, Address], object] = getattr(
            protocol, "datagram_received", _no_datagrams)
        try:
            peer: Address | None = sock.getpeername()
        except OSError:
            peer = None
        #: The address every datagram goes to when ``sendto`` has none (remote_addr, as
        #: resolved), and the only one it accepts then.
        self._address = remote if remote is not None else peer
        self._peername = peer
        self._connected = peer is not None
        self._max_send = min(options.max_datagram, max_payload(family, self._address))
        # A connected endpoint uses the batch arrays the loop's connected sockets share
        # (arrays of its own made opening one cost 6x the loop's own endpoint).
        self._engine = SocketEngine(loop, sock, options, self, named=not self._connected,
                                    batches=loop_batches(loop))
        self._writer = self._engine.writer
        self._writer._send_failed = self._send_failed
        self._writer._flushed = self._after_flush
        self._queue = self._writer.queue
        self._limit = self._queue.limit
        self._addresses = _Addresses(family)
        self._accounts: dict[Address, TxAccount] = {}
        self._default: TxAccount | None = None
        if self._address is not None:
            sockaddr = None if self._connected else sockaddr_from_address(
                family, self._address)
            self._default = TxAccount(sockaddr, self._refused)
            self._accounts[tuple(self._address)] = self._default
        self._extra = {"socket": trsock.TransportSocket(sock), "sockname": sock.getsockname(),
                       "peername": peer}
        # Flow control (bytes, as asyncio counts them).
        self._high = _HIGH_WATER
        self._low = _HIGH_WATER // 4
        self._buffered = 0
        self._writing_paused = False
        # Reading: a non-empty ``_halt`` stops a batch's delivery between two datagrams
        # (pause_reading or close from a callback); checked per datagram as a local list's
        # truth, the cheapest test there is.
        self._halt: list[bool] = []
        self._paused = False
        self._started = False
        self._held: deque[tuple[bytes, Address]] = deque()
        self._closing = False
        self._lost = False
        self._closed_sends = 0
        # Counters (per batch, never per datagram).
        self._rx_packets = 0
        self._rx_bytes = 0
        self._truncated = 0
        self._dropped_closed = 0
        self._queue_full = 0
        self._too_long = 0
        self._icmp_errors = 0

    # -- opening ------------------------------------------------------------------------

    def _open(self, waiter: asyncio.Future[None]) -> None:
        # As asyncio does: connection_made, then reading, then the caller's await returns,
        # each one loop step after the other.
        loop = self._loop
        loop.call_soon(self._call_protocol, "connection_made", self)
        loop.call_soon(self._start_reading)
        loop.call_soon(_set_result_unless_cancelled, waiter)

    def _start_reading(self) -> None:
        self._started = True
        if not self._closing and not self._paused:
            self._engine.reader.start()

    def _call_protocol(self, name: str, *args: object) -> None:
        method = getattr(self._protocol, name, None)
        if method is None:
            return
        try:
            method(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": f"udpx: protocol.{name}() failed",
                "exception": exc, "transport": self, "protocol": self._protocol})

    # -- the sink: batches straight to datagram_received --------------------------------

    def feed_batch(self, keys: Sequence[PeerKey] | None, datagrams: Sequence[bytes],
                   lengths: Sequence[int]) -> None:
        self._rx_packets += len(lengths)
        self._rx_bytes += sum(lengths)
        addresses: Iterator[Address] = (
            map(self._addresses.__getitem__, keys) if keys is not None
            else repeat(self._peername))  # type: ignore[arg-type]
        items = zip(datagrams, addresses)
        if self._halt:
            self._keep(items)
            return
        received = self._received
        halt = self._halt
        while True:
            # Hot path: a call per datagram; the addresses come from the cache through
            # C-level map, the stop test is a local list's truth.
            try:
                for data, address in items:
                    received(data, address)
                    if halt:
                        self._keep(items)
                        return
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                # As on asyncio's loop: reported, and the next datagram is delivered.
                self._callback_failed(exc)
                if halt:
                    self._keep(items)
                    return

    def _keep(self, items: Iterator[tuple[bytes, Address]]) -> None:
        """The rest of a batch, once delivery stopped: held until reading resumes, or
        dropped (counted) when the transport is closing."""
        rest = list(items)
        if self._closing:
            self._drop_undelivered(rest)
        else:
            self._held.extend(rest)

    def _drop_undelivered(self, items: Collection[tuple[bytes, Address]]) -> None:
        """``items`` were counted as received when they arrived but will never be delivered
        (the endpoint closed): they leave the delivered counts, counted as ``closed``."""
        self._rx_packets -= len(items)
        self._rx_bytes -= sum(len(data) for data, _ in items)
        self._dropped_closed += len(items)

    def _callback_failed(self, exc: BaseException) -> None:
        self._loop.call_exception_handler({
            "message": "udpx: protocol.datagram_received() failed",
            "exception": exc, "transport": self, "protocol": self._protocol})

    def feed_one(self, key: PeerKey | None, data: bytes | None) -> None:
        if data is None:
            self._truncated += 1
            return
        address = self._addresses[key] if key is not None else self._peername
        assert address is not None
        if self._halt and self._closing:
            self._dropped_closed += 1
            return
        self._rx_packets += 1
        self._rx_bytes += len(data)
        if self._halt:
            self._held.append((data, address))
            return
        try:
            self._received(data, address)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._callback_failed(exc)

    def socket_error(self, exc: OSError) -> None:
        # An ICMP error on a connected socket (port unreachable...), as asyncio reports it.
        self._icmp_errors += 1
        self._call_protocol("error_received", exc)

    def closed_unread(self, count: int) -> None:
        self._dropped_closed += count

    def peer_error(self, key: PeerKey, exc: OSError, info: int) -> None:
        self._icmp_errors += 1
        self._call_protocol("error_received", exc)

    def count_ecn(self, keys: Sequence[PeerKey] | None, codes: Sequence[int],
                  pieces: Sequence[int]) -> None:
        return None  # (the endpoint does not ask for ECN marks)

    # -- sending --------------------------------------------------------------------------

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        """Queue one datagram for ``addr`` (None: the endpoint's remote address); it leaves
        with the rest of this loop iteration's datagrams, in one batch.

        Raises:
            TypeError: ``data`` is not bytes-like, or ``addr`` not a tuple.
            ValueError: ``addr`` is malformed, needs a DNS lookup, or differs from the
                remote address of a connected endpoint; or no address on an unconnected one.
        """
        if type(data) is not bytes:
            data = _own_bytes(data)
        if addr is None:
            account = self._default
            if account is None:
                raise ValueError("sendto() needs an address: the endpoint has no remote "
                                 "address")
        else:
            try:
                account = self._accounts.get(addr)
            except TypeError:  # unhashable
                raise TypeError(f"address must be a tuple, got {addr!r}") from None
            if account is None:
                account = self._account_for(addr)
        if self._closing:
            self._send_on_closed()
            return
        size = len(data)
        if size > self._max_send:
            self._too_long += 1
            self._loop.call_soon(self._call_protocol, "error_received", OSError(
                errno.EMSGSIZE, f"udpx: datagram of {size} bytes is above the "
                                f"{self._max_send}-byte limit (max_datagram)"))
            return
        queue = self._queue
        if len(queue.datagrams) >= self._limit:
            self._writer.flush_now()
            if len(queue.datagrams) >= self._limit:
                self._queue_full += 1
                self._loop.call_soon(self._call_protocol, "error_received", OSError(
                    errno.ENOBUFS, f"udpx: transmit queue full ({self._limit} datagrams, "
                                   f"tx_queue_size)"))
                return
        queue.datagrams.append(data)
        queue.owners.append(account)
        account.enqueued += 1
        self._buffered += size
        if self._buffered > self._high:
            # A whole batch and more waits: send it now rather than at the end of the
            # iteration, and pause the protocol only if the kernel did not take it.
            self._writer.flush_now()
            if self._buffered > self._high:
                self._pause_protocol()
        else:
            self._writer.schedule()

    def _account_for(self, addr: object) -> TxAccount:
        if self._address is not None:
            # As asyncio: an endpoint made with a remote address sends only there.
            raise ValueError(f"Invalid address: must be None or {self._address}")
        sockaddr = _sockaddr(self._family, addr)
        account = TxAccount(sockaddr)
        accounts = self._accounts
        if len(accounts) >= _CACHE_SIZE:
            accounts.clear()
            if self._default is not None and self._address is not None:
                accounts[tuple(self._address)] = self._default
        accounts[addr] = account  # type: ignore[index]
        return account

    def _send_on_closed(self) -> None:
        self._closed_sends += 1
        self._dropped_closed += 1
        if self._closed_sends >= _LOG_CLOSED_SENDS:
            logger.warning("udpx: sendto() on a closed endpoint (%d datagrams dropped)",
                           self._closed_sends)

    def _refused(self, exc: OSError) -> None:
        # ECONNREFUSED on a connected socket's send: the peer's earlier ICMP report.
        self._icmp_errors += 1
        self._loop.call_soon(self._call_protocol, "error_received", exc)

    def _send_failed(self, exc: OSError) -> None:
        # From inside the writer: the protocol hears of it from the loop, not mid-batch.
        self._loop.call_soon(self._call_protocol, "error_received", exc)

    def _after_flush(self) -> None:
        datagrams = self._queue.datagrams
        self._buffered = sum(map(len, datagrams)) if datagrams else 0
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            self._call_protocol("resume_writing")

    def _pause_protocol(self) -> None:
        if not self._writing_paused:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As asyncio: ``high`` defaults to 64 KiB (or 4 x ``low``), ``low`` to ``high // 4``.

        Raises:
            ValueError: not ``high >= low >= 0``.
        """
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high = high
        self._low = low
        if self._buffered > high:
            self._pause_protocol()
        elif self._writing_paused and self._buffered <= low:
            self._writing_paused = False
            self._call_protocol("resume_writing")

    def can_write_eof(self) -> bool:
        return False

    # -- reading control ------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._closing and not self._paused

    def pause_reading(self) -> None:
        """Deliver nothing more until ``resume_reading()``; what arrives meanwhile waits in
        the kernel's buffer (a batch already read waits in the transport)."""
        if not self.is_reading():
            return
        self._paused = True
        if not self._halt:
            self._halt.append(True)
        self._engine.reader.stop()

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._loop.call_soon(self._deliver_held)

    def _deliver_held(self) -> None:
        if self._closing or self._paused:
            return
        held = self._held
        self._halt.clear()
        received = self._received
        while held and not self._halt:
            data, address = held.popleft()
            try:
                received(data, address)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._callback_failed(exc)
        if not self._halt and self._started:
            self._engine.reader.start()

    # -- closing --------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading, send what is queued, then call ``connection_lost(None)``."""
        if self._closing:
            return
        self._begin_close()
        self._engine.close(self._released)

    def abort(self) -> None:
        """Close at once: what is queued is dropped (counted as ``closed``)."""
        if self._lost:
            return
        if not self._closing:
            self._begin_close()
        self._dropped_closed += self._writer.discard()
        self._engine.close(self._released)

    def _begin_close(self) -> None:
        self._closing = True
        if not self._halt:
            self._halt.append(True)
        self._drop_undelivered(self._held)
        self._held.clear()
        self._engine.stop_reading()

    def _released(self) -> None:
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._call_protocol, "connection_lost", None)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "_closing", True):
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._engine.abort()

    # -- the rest of the BaseTransport surface ------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._received = getattr(protocol, "datagram_received", _no_datagrams)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return (f"<udpx.EndpointTransport {state} sockname={self._extra['sockname']!r} "
                f"peername={self._peername!r}>")

    # -- udpx's own -------------------------------------------------------------------------

    @property
    def stats(self) -> ConnStats:
        """The endpoint's counters: datagrams delivered and sent, and every drop by reason:
        ``truncated`` (above ``max_datagram``), ``closed`` (arriving or queued when it
        closed), ``tx_queue_full``, ``too_long`` (a send above ``max_datagram``),
        ``send_error`` (refused by the kernel) and ``kernel`` (the socket's buffer
        overflowed)."""
        writer = self._writer
        return ConnStats(
            rx_packets=self._rx_packets, rx_bytes=self._rx_bytes,
            tx_packets=writer.tx_packets, tx_bytes=writer.tx_bytes,
            drops=drops_mapping(truncated=self._truncated, closed=self._dropped_closed,
                                tx_queue_full=self._queue_full, too_long=self._too_long,
                                send_error=writer.tx_errors,
                                kernel=self._engine.kernel_drops()),
            icmp_errors=self._icmp_errors, ecn=ecn_mapping([0, 0, 0, 0]))

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: the socket, the engine, the flow-control state and
        the counters."""
        return {"mode": "endpoint", "sockname": self._extra["sockname"],
                "peername": self._peername, "closing": self._closing,
                "reading": self.is_reading(), "write_buffer": self._buffered,
                "write_limits": [self._low, self._high],
                "writing_paused": self._writing_paused, "peers_cached": len(self._addresses),
                "socket": self._engine.describe(), "stats": self.stats.as_dict()}


def _no_datagrams(data: bytes, addr: Address) -> None:
    return None


def _set_result_unless_cancelled(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.set_result(None)


# -- create_datagram_endpoint ------------------------------------------------------------

Original = Callable[..., Any]

#: The loop's own method, for what udpx does not serve (set by patch_loop per loop).
_ORIGINAL_ATTR = "_udpx_original_create_datagram_endpoint"


def _stock_method(loop: asyncio.AbstractEventLoop) -> Original:
    original = getattr(loop, _ORIGINAL_ATTR, None)
    return original if original is not None else loop.create_datagram_endpoint


def endpoint_options(udpx_options: dict[str, Any]) -> Options:
    """The ``Options`` of an endpoint from its udpx keyword arguments.

    Raises:
        TypeError: an argument is not one of the endpoint's options (naming it).
        ValueError: a value is invalid (naming it).
    """
    unknown = sorted(set(udpx_options) - ENDPOINT_OPTIONS)
    if unknown:
        raise TypeError(f"create_datagram_endpoint() got unexpected keyword argument(s) "
                        f"{', '.join(unknown)}; udpx options it takes: "
                        f"{', '.join(sorted(ENDPOINT_OPTIONS))}")
    return Options(**udpx_options)


def fallback_reason(loop: asyncio.AbstractEventLoop, local_addr: object, remote_addr: object,
                    *, family: int, proto: int, sock: socket.socket | None) -> str | None:
    """Why udpx's engine cannot serve these arguments (then the loop's own method does), or
    None."""
    if not sys.platform.startswith("linux"):
        return f"platform {sys.platform} (recvmmsg/sendmmsg are Linux's)"
    proactor = getattr(asyncio, "ProactorEventLoop", None)
    if proactor is not None and isinstance(loop, proactor):  # pragma: no cover - Windows
        return "a Proactor loop cannot watch sockets"
    if sock is not None:
        # (A socket of another type is udpx's to refuse, with asyncio's error.)
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return f"socket family {sock.family!r}"
        return None
    if family not in (0, socket.AF_INET, socket.AF_INET6):
        return f"address family {family!r}"
    if proto not in (0, socket.IPPROTO_UDP):
        return f"protocol {proto!r}"
    for address in (local_addr, remote_addr):
        if isinstance(address, (str, bytes)):
            return "an AF_UNIX path"
    return None


def _numeric_info(host: Any, port: Any, *, family: int, proto: int,
                  verb: str) -> list[Any] | None:
    """The one address a numeric host and port stand for, read as asyncio's own method reads
    them (no ``getaddrinfo`` call), or None where a lookup must decide: a name, a service
    name, a scope (``%``), no host.

    As asyncio's: a port is anything ``int()`` takes (``None`` and ``""`` are 0), an IPv4
    address is tried before an IPv6 one, and a host with a NUL in it raises ValueError
    (getaddrinfo would read up to the NUL).

    Raises:
        OverflowError: the port is outside 0-65535 (getaddrinfo would wrap it round).
        ValueError: the host has a NUL character in it.
    """
    if host is None or proto not in (0, socket.IPPROTO_UDP):
        return None
    if port is None or (isinstance(port, (str, bytes)) and not port):
        number = 0
    else:
        try:
            number = int(port)
        except (TypeError, ValueError):
            return None  # a service name ("domain")
    if isinstance(host, bytes):
        host = host.decode("idna")
    if not isinstance(host, str) or "%" in host:
        return None
    for candidate in _NUMERIC_FAMILIES if family == 0 else (family,):
        try:
            socket.inet_pton(candidate, host)
        except OSError:
            continue
        _check_port(number, verb)
        address = (host, number) if candidate == socket.AF_INET else (host, number, 0, 0)
        return [(candidate, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", address)]
    return None


_NUMERIC_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _check_port(number: int, verb: str) -> None:
    """Refuse a port outside 0-65535 as the socket would (getaddrinfo would wrap it round).

    Raises:
        OverflowError: it is.
    """
    if not 0 <= number <= 65535:
        raise OverflowError(f"{verb}(): port must be 0-65535.")


async def _getaddrinfo(loop: asyncio.AbstractEventLoop, host: Any, port: Any, *, family: int,
                       proto: int, flags: int, verb: str = "connect") -> list[Any]:
    """``getaddrinfo`` for a datagram socket: at once for a numeric host and port, whose
    answer needs no lookup (as asyncio's own method does: a program that opens an endpoint
    per query, as DNS clients do, paid a round trip through the executor's thread for
    each), and in the loop's executor otherwise."""
    numeric = _numeric_info(host, port, family=family, proto=proto, verb=verb)
    if numeric is not None:
        return numeric
    try:
        return socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, proto,
                                  flags | socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError):
        pass  # a name, or a service name: a lookup
    return await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM,
                                  proto=proto, flags=flags)


async def _open_socket(loop: asyncio.AbstractEventLoop, local_addr: Any, remote_addr: Any,
                       *, family: int, proto: int, flags: int, reuse_port: bool | None,
                       allow_broadcast: bool | None) -> tuple[socket.socket, Address | None]:
    """A bound (and connected) socket for the arguments, tried as asyncio tries them: every
    (family, protocol) both addresses resolve to, the first that works."""
    if not (local_addr or remote_addr):
        if family == 0:
            raise ValueError("unexpected address family")
        pairs: list[tuple[tuple[int, int], list[Any]]] = [((family, proto), [None, None])]
    else:
        infos: dict[tuple[int, int], list[Any]] = {}
        for index, address in ((0, local_addr), (1, remote_addr)):
            if address is None:
                continue
            if not (isinstance(address, tuple) and len(address) == 2):
                raise TypeError("2-tuple is expected")
            port = address[1]
            verb = "bind" if index == 0 else "connect"
            if isinstance(port, int):
                _check_port(port, verb)
            found = await _getaddrinfo(loop, address[0], port, family=family, proto=proto,
                                       flags=flags, verb=verb)
            if not found:
                raise OSError("getaddrinfo() returned empty list")
            for info_family, _, info_proto, _, resolved in found:
                if info_family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                infos.setdefault((info_family, info_proto), [None, None])[index] = resolved
        pairs = [(key, pair) for key, pair in infos.items()
                 if not ((local_addr and pair[0] is None) or (remote_addr and pair[1] is None))]
        if not pairs:
            raise ValueError("can not get address information")
    errors: list[OSError] = []
    for (pair_family, pair_proto), (local, remote) in pairs:
        sock: socket.socket | None = None
        try:
            sock = socket.socket(pair_family, socket.SOCK_DGRAM, pair_proto)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if allow_broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setblocking(False)
            if local_addr:
                sock.bind(local)
            if remote_addr and not allow_broadcast:
                sock.connect(remote)  # UDP: no handshake, never blocks
        except OSError as exc:
            if sock is not None:
                sock.close()
            errors.append(exc)
            continue
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return sock, (remote if remote_addr else None)
    raise errors[0]


@functools.lru_cache(maxsize=16, typed=True)
def _endpoint_options(batch_size: int, max_datagram: int, tx_queue_size: int,  # noqa: PLR0917
                      rcvbuf: int | None, sndbuf: int | None, gso: bool, gro: bool,
                      rx_coalesce: float) -> Options:
    """The (immutable) options of an endpoint, validated once per set of values: a DNS-style
    client opens an endpoint per query, always with the same ones. (``typed``: ``True`` is
    not taken for an earlier ``1``, which the validation would refuse.)"""
    return Options(batch_size=batch_size, max_datagram=max_datagram,
                   tx_queue_size=tx_queue_size, rcvbuf=rcvbuf, sndbuf=sndbuf, gso=gso, gro=gro,
                   rx_coalesce=rx_coalesce)


async def create_datagram_endpoint(
        protocol_factory: Callable[[], asyncio.BaseProtocol], local_addr: Any = None,
        remote_addr: Any = None, *, family: int = 0, proto: int = 0, flags: int = 0,
        reuse_port: bool | None = None, allow_broadcast: bool | None = None,
        sock: socket.socket | None = None, batch_size: int = DEFAULTS.batch_size,
        max_datagram: int = DEFAULTS.max_datagram, tx_queue_size: int = DEFAULTS.tx_queue_size,
        rcvbuf: int | None = DEFAULTS.rcvbuf, sndbuf: int | None = DEFAULTS.sndbuf,
        gso: bool = DEFAULTS.gso, gro: bool = DEFAULTS.gro,
        rx_coalesce: float = DEFAULTS.rx_coalesce,
) -> tuple[asyncio.DatagramTransport, asyncio.BaseProtocol]:
    """``loop.create_datagram_endpoint`` on udpx's batch engine, for the running loop.

    The arguments up to ``sock`` are the event loop method's, with its semantics; the rest
    are udpx's (see ``udpx.Options``). Returns ``(transport, protocol)``; the transport is a
    ``udpx.EndpointTransport`` (an ``asyncio.DatagramTransport`` with ``stats`` and
    ``describe()``), or the loop's own where udpx cannot serve the arguments: on other
    platforms than Linux, for ``AF_UNIX``, another protocol than UDP (then the udpx options
    are ignored).

    Raises:
        ValueError, TypeError: as the loop's method does for its arguments, and for an
            invalid udpx option (naming it).
        OSError: the socket cannot be created, bound or connected.
    """
    loop = asyncio.get_running_loop()
    try:
        options = _endpoint_options(batch_size, max_datagram, tx_queue_size, rcvbuf, sndbuf,
                                    gso, gro, rx_coalesce)
    except TypeError:
        # An unhashable value (a list...): no memo; the validation names the option.
        options = Options(batch_size=batch_size, max_datagram=max_datagram,
                          tx_queue_size=tx_queue_size, rcvbuf=rcvbuf, sndbuf=sndbuf, gso=gso,
                          gro=gro, rx_coalesce=rx_coalesce)
    return await open_endpoint(loop, _stock_method(loop), protocol_factory, local_addr,
                               remote_addr, family=family, proto=proto, flags=flags,
                               reuse_port=reuse_port, allow_broadcast=allow_broadcast,
                               sock=sock, options=options)


async def open_endpoint(
        loop: asyncio.AbstractEventLoop, original: Original,
        protocol_factory: Callable[[], asyncio.BaseProtocol], local_addr: Any,
        remote_addr: Any, *, family: int, proto: int, flags: int, reuse_port: bool | None,
        allow_broadcast: bool | None, sock: socket.socket | None,
        options: Options) -> tuple[asyncio.DatagramTransport, asyncio.BaseProtocol]:
    """The endpoint for these arguments: udpx's, or ``original``'s where udpx falls back."""
    reason = fallback_reason(loop, local_addr, remote_addr, family=family, proto=proto,
                             sock=sock)
    if reason is not None:
        logger.debug("udpx: create_datagram_endpoint falls back to the loop's (%s)", reason)
        extra = {name: value for name, value in (
            ("family", family), ("proto", proto), ("flags", flags),
            ("reuse_port", reuse_port), ("allow_broadcast", allow_broadcast),
            ("sock", sock)) if value}
        result: tuple[asyncio.DatagramTransport, asyncio.BaseProtocol] = await original(
            protocol_factory, local_addr, remote_addr, **extra)
        return result
    remote: Address | None = None
    if sock is not None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError(f"A UDP Socket was expected, got {sock!r}")
        given = dict(local_addr=local_addr, remote_addr=remote_addr, family=family,
                     proto=proto, flags=flags, reuse_port=reuse_port,
                     allow_broadcast=allow_broadcast)
        problems = ", ".join(f"{name}={value}" for name, value in given.items() if value)
        if problems:
            raise ValueError(f"socket modifier keyword arguments can not be used when sock "
                             f"is specified. ({problems})")
        sock.setblocking(False)
    else:
        sock, remote = await _open_socket(loop, local_addr, remote_addr, family=family,
                                          proto=proto, flags=flags, reuse_port=reuse_port,
                                          allow_broadcast=allow_broadcast)
    try:
        set_buffers(sock, options.rcvbuf, options.sndbuf)
        protocol = protocol_factory()
        transport = EndpointTransport(loop, sock, protocol, options, remote)
    except BaseException:
        sock.close()
        raise
    waiter: asyncio.Future[None] = loop.create_future()
    transport._open(waiter)
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return transport, protocol
