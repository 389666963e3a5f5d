"""Validated options for ``listen()`` and ``dial()``."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULTS", "MAX_BATCH_SIZE", "MAX_UDP_PAYLOAD", "Options"]

#: The largest UDP payload that fits an IP packet: 65,535 minus the UDP header and a minimal
#: IPv4 header gives 65,507; IPv6 has no header in the 65,535 and allows 65,527.
MAX_UDP_PAYLOAD = {4: 65507, 6: 65527}

#: Linux caps the number of messages of one recvmmsg/sendmmsg call at UIO_MAXIOV.
MAX_BATCH_SIZE = 1024


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    # bool is an int subclass; ``batch_size=True`` is a mistake, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """Every option of a listener or dialed connection, validated on construction.

    Raises:
        ValueError: naming the first option whose value is invalid.
    """

    batch_size: int = 64
    """Datagrams per recvmmsg/sendmmsg call. 1 uses one plain syscall per datagram."""

    max_datagram: int = 65535
    """Receive slot size and send limit in bytes (1-65535). Larger datagrams received are
    dropped and counted as ``truncated``; larger sends raise ``MessageTooLong``."""

    rx_queue_size: int = 1024
    """Datagrams queued per connection before further ones are dropped (``rx_queue_full``)."""

    tx_queue_size: int = 4096
    """Datagrams queued per socket for its writer; ``send()`` waits while it is full."""

    idle_timeout: float | None = 3600.0
    """Seconds without traffic either way before a connection is closed; None: never."""

    rx_memory_limit: int = 64 * 2**20
    """Bytes that the receive queues of one socket (all connections of a listener) may hold
    together, counting each datagram as its payload plus 48 bytes. A datagram beyond it is
    dropped and counted as ``memory_limit``; reading makes room again. With the defaults,
    ``backlog x rx_queue_size x 64 KiB`` could otherwise reach 64 GiB."""

    max_conns: int = 65536
    """Open connections per listener; datagrams from new peers beyond it are dropped."""

    backlog: int = 1024
    """Connections created but not yet accepted; beyond it, new peers' datagrams are dropped."""

    reuse_port: bool = False
    """Set SO_REUSEPORT so that several sockets (processes) can share the port. ``listen()``
    takes None for it (its default): True in a worker of a multi-worker ``udpx.run()``,
    else False."""

    connected: bool = False
    """listen() only: give every peer a socket of its own, bound to the listener's address
    (the exact one the peer sent to, on a wildcard listener) and connect()ed to the peer, so
    that the kernel demultiplexes by 4-tuple: each connection then has its own kernel buffer,
    kernel drop count and ICMP errors, and its own batch reader and writer. Costs one file
    descriptor per connection; a peer beyond RLIMIT_NOFILE is refused (``fd_limit``). Batch
    engine only."""

    rcvbuf: int | None = None
    """Requested SO_RCVBUF in bytes (the kernel doubles and caps it); None: kernel default."""

    sndbuf: int | None = None
    """Requested SO_SNDBUF in bytes; None: kernel default."""

    local_addr: tuple[str, int] | None = None
    """dial() only: (host, port) to bind before connecting."""

    gso: bool = True
    """Send runs of equal-size datagrams to one peer (four or more, or two or more with nothing
    queued behind them; shorter ones go in the sendmmsg batch) as one UDP GSO send where the
    kernel supports it (Linux); turned off for the socket at the first refusal. Off when
    ``batch_size`` is 1."""

    gro: bool = True
    """Receive runs of datagrams that the kernel coalesced (UDP GRO: the peer sent them with
    GSO) as one message each, and split them: one kernel receive per run instead of per
    datagram. Used where the kernel supports it, with the default ``max_datagram`` and a
    ``batch_size`` above 1."""

    dont_fragment: bool = False
    """Send every datagram with don't-fragment (IP_PMTUDISC_PROBE / IPV6_DONTFRAG), as QUIC
    requires: a router that cannot forward one drops it and reports the path MTU, which sets
    ``conn.path_mtu``; from then on a larger send raises ``MessageTooLong`` with ``.mtu``.
    Batch engine only (ValueError with ``engine="transport"``)."""

    ecn: bool = False
    """Read each received datagram's ECN codepoint (IP_RECVTOS / IPV6_RECVTCLASS) and count it
    per connection (``stats.ecn``), and let ``conn.tos`` mark what a listener's connections
    send. Needs the batch engine with ``batch_size`` above 1 (ValueError otherwise). Costs a
    control-message walk per datagram."""

    rx_coalesce: float = 0.001
    """Read coalescing, in seconds (0: off): the longest the reader waits between reads of a
    busy socket so that each read returns a fuller batch, as a network card's interrupt
    moderation does. Only when the socket was emptied and datagrams arrive fast enough to fill a
    batch of 64 in that time (64,000 datagrams/s at the default, over two spans of measuring in
    a row), and only while that pays (with small datagrams, not within the kernel's default
    receive buffer): the reader stops pausing for a while when a pause let the kernel drop,
    filled more than a quarter of the receive buffer (give a busy socket a larger ``rcvbuf``),
    or when two in a row brought less than half the datagrams the rate promised (peers waiting
    for replies). While pauses pay, one follows the other at once. A socket that sends at least
    half as many datagrams as it reads (a server answering requests) does not pause. Light
    traffic is never delayed; a steady stream may wait up to this long plus the loop's timer
    granularity (about 1 ms). Cuts the CPU per datagram of a reader that keeps up with a steady
    stream from peers without GSO by more than half. Batch engine only."""

    engine: str = "auto"
    """How the socket is driven: ``"mmsg"`` (udpx's batch engine: the loop watches the socket
    and udpx reads and writes it with recvmmsg/sendmmsg), ``"transport"`` (the event loop's
    own datagram transport, one datagram per call: the portable path, which works on any
    loop, also Windows' Proactor), or ``"auto"``: the batch engine wherever the loop can watch
    a socket."""

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("max_datagram", self.max_datagram, 1, 65535)
        _check_int("rx_queue_size", self.rx_queue_size, 1)
        _check_int("tx_queue_size", self.tx_queue_size, 1)
        _check_int("rx_memory_limit", self.rx_memory_limit, 1)
        _check_int("max_conns", self.max_conns, 1)
        _check_int("backlog", self.backlog, 1)
        timeout = self.idle_timeout
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise ValueError(
                    f"idle_timeout must be a number of seconds or None, got {timeout!r}")
            try:
                finite = math.isfinite(timeout)
            except OverflowError:  # an int beyond the float range
                finite = False
            if not (timeout > 0 and finite):
                raise ValueError(f"idle_timeout must be positive and finite, got {timeout!r}")
        coalesce = self.rx_coalesce
        if isinstance(coalesce, bool) or not isinstance(coalesce, int | float) or not (
                0 <= coalesce <= 1):
            raise ValueError(f"rx_coalesce must be a number of seconds between 0 and 1 "
                             f"(0: off), got {coalesce!r}")
        if self.connected and self.engine == "transport":
            raise ValueError("connected=True needs the batch engine (engine 'auto' or 'mmsg'), "
                             "got engine='transport'")
        if self.ecn and (self.batch_size == 1 or self.engine == "transport"):
            # (The codepoints come from the batch receiver's control space; a one-datagram
            # receiver reads none, and ECN counts that stayed at 0 would say nothing arrived
            # marked.)
            raise ValueError(f"ecn=True needs the batch engine with batch_size above 1, got "
                             f"batch_size={self.batch_size!r}, engine={self.engine!r}")
        if self.dont_fragment and self.engine == "transport":
            # (The loop's transport neither sets it nor reads the error queue that reports
            # path MTUs: without it MessageTooLong would never come.)
            raise ValueError("dont_fragment=True needs the batch engine (engine 'auto' or "
                             "'mmsg'), got engine='transport'")
        if self.engine not in ("auto", "mmsg", "transport"):
            raise ValueError(f"engine must be 'auto', 'mmsg' or 'transport', got "
                             f"{self.engine!r}")
        for name in ("reuse_port", "connected", "gso", "gro", "dont_fragment", "ecn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("rcvbuf", "sndbuf"):
            size = getattr(self, name)
            if size is not None:
                _check_int(name, size, 1, 2**31 - 1)
        local = self.local_addr
        if local is not None and not (
            isinstance(local, tuple)
            and len(local) == 2
            and isinstance(local[0], str)
            and isinstance(local[1], int)
            and not isinstance(local[1], bool)
            and 0 <= local[1] <= 65535
        ):
            raise ValueError(f"local_addr must be a (host, port) tuple, got {local!r}")


#: Every option's default: the one place they are written (``listen()`` and ``dial()`` take
#: their signatures' defaults from here).
DEFAULTS = Options()
