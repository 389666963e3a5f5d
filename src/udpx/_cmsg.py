"""Control messages and per-socket kernel options: the one place udpx builds and parses them.

UDP_SEGMENT (GSO: one send, many datagrams), UDP_GRO (one receive, many datagrams), IP_PKTINFO /
IPV6_PKTINFO (the local address), IP_TOS / IPV6_TCLASS (DSCP and ECN), the error queue's
``sock_extended_err`` (ICMP errors and path MTUs), don't-fragment. Each ``enable_*`` / ``set_*``
says whether the kernel agreed, and the engine keeps the feature off where it did not.

The packet-info ones give a wildcard listener the right source address.

A socket bound to every address (``0.0.0.0``, ``::``) receives datagrams sent to any local
address, but a reply leaves with the source address the routing table picks, which is not
always the one the peer sent to (secondary addresses, 127.0.0.2, a VIP, IPv4 on a dual-stack
socket): the peer's connected socket then drops it. With IP_PKTINFO / IPV6_RECVPKTINFO the
kernel says, per datagram, which local address it was sent to; udpx keys the connection by
(peer, local address) and sends each of its datagrams with that address as the source
(IP_PKTINFO's ``ipi_spec_dst``, IPV6_PKTINFO's ``ipi6_addr``), as Go, quinn and msquic do.

Layouts (Linux, glibc): ``struct in_pktinfo { int ipi_ifindex; struct in_addr ipi_spec_dst;
struct in_addr ipi_addr; }`` (12 bytes; ``ipi_addr`` is the header's destination),
``struct in6_pktinfo { struct in6_addr ipi6_addr; int ipi6_ifindex; }`` (20 bytes). A
dual-stack socket reports an IPv4 datagram with IP_PKTINFO and sends to an IPv4-mapped peer
with an IPV6_PKTINFO whose address is IPv4-mapped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import final

__all__ = [
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "ICMP_ERRNOS",
    "IPPROTO_IP",
    "IPPROTO_IPV6",
    "IPV6_PKTINFO",
    "IP_PKTINFO",
    "V4_MAPPED",
    "SocketState",
    "cmsg_space",
    "enable_pktinfo",
    "pktinfo_ancillary",
    "pktinfo_cmsg",
]

logger = logging.getLogger("udpx")

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IPPROTO_IP = 0
IP_PKTINFO = 8
IP_RECVERR = 11
IPPROTO_IPV6 = 41
IPV6_RECVERR = 25
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
MSG_ERRQUEUE = 0x2000
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3
IPV6_DONTFRAG = 62
IP_TOS = 1
IP_RECVTOS = 13
IPV6_RECVTCLASS = 66
IPV6_TCLASS = 67
#: struct sock_extended_err: u32 ee_errno; u8 ee_origin, ee_type, ee_code, ee_pad;
#: u32 ee_info (the MTU, for "fragmentation needed"), ee_data.
_EXTENDED_ERR = struct.Struct("=IBBBBII")
#: ee_origin of an error the local stack raised itself (a datagram over the device's MTU).
SO_EE_ORIGIN_LOCAL = 1

_SIZE_T = ctypes.sizeof(ctypes.c_size_t)
#: struct cmsghdr: size_t cmsg_len, int cmsg_level, int cmsg_type, then the data (aligned).
CMSG_HEADER = (_SIZE_T + 8 + _SIZE_T - 1) & ~(_SIZE_T - 1)
#: The first 12 bytes of an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
V4_MAPPED = bytes(10) + b"\xff\xff"


def _align(length: int) -> int:
    return (length + _SIZE_T - 1) & ~(_SIZE_T - 1)


def cmsg_space(data_length: int) -> int:
    """CMSG_SPACE: the bytes one control message with ``data_length`` bytes of data takes."""
    return CMSG_HEADER + _align(data_length)


# UDP generic segmentation offload: one sendmsg carries many equal-size datagrams for one peer,
# segmented by the kernel (or the NIC). The kernel's per-datagram send cost dominates sending,
# so this is the send side's real win (measured on loopback: about 4x the rate of sendmmsg).
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on older kernels; newer ones allow 128
GSO_MAX_BYTES = 65507  # one IPv4 datagram's payload (IPv4-mapped peers included)
HAVE_GSO = sys.platform.startswith("linux")

# Errors a GSO send can get that say "not for this socket or device" rather than "not for this
# destination": the device cannot checksum segments (EIO), the kernel has no UDP_SEGMENT
# (ENOPROTOOPT, EOPNOTSUPP). EINVAL is ambiguous: the kernel also returns it for a bad
# destination (port 0) or a segment above the path MTU, so it turns GSO off only while no GSO
# send ever succeeded on the socket and the destination is well formed.
_GSO_REFUSALS = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

#: What an ICMP error leaves as a socket's pending error (and so as the failure of its next
#: send, whatever that send's destination).
ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                         errno.EHOSTDOWN, errno.ENETDOWN, errno.EPROTO, errno.EACCES,
                         errno.EMSGSIZE, errno.ENONET, errno.ETIMEDOUT})


def gso_ancillary(segment_size: int) -> tuple[int, int, bytes]:
    """The ``(level, type, data)`` that makes one send a run of ``segment_size`` datagrams."""
    return SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment_size)


def enable_gro(sock: socket.socket) -> bool:
    """Have the kernel hand coalesced runs as one message with their segment size."""
    family = sock.family
    if family not in _gro_anchors:
        hold_gro_switch(family)
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


# While any socket has UDP_GRO, the kernel keeps its UDP encapsulation receive hook on (a
# static key per family); it turns it on with the first such socket and off when the last
# one closes, and each turn patches the kernel's code. Measured: making and closing a GRO
# socket costs 122 us (IPv6: 236 us) when no other GRO socket is open, 6.5 us when one is: a
# program that opens an endpoint or a dial per query paid that on each. So the first GRO
# socket of each family also makes one of that family, unbound (it receives nothing), kept for
# the process's life. (Recent kernels turn both families' hooks on for an IPv6 socket, older
# ones only the IPv6 one: one per family holds them everywhere.) Each costs the process one
# file descriptor, kept as a bare number (a socket object left to the interpreter's exit
# would warn that it was never closed), not inherited by programs the process runs.
_gro_anchors: dict[int, int] = {}  # family: descriptor (-1: the kernel has no UDP_GRO)
_gro_anchor_lock = threading.Lock()


def hold_gro_switch(family: int) -> None:
    """Make the process's GRO switch socket of ``family``, if it has none yet."""
    with _gro_anchor_lock:  # (loops in several threads)
        if family in _gro_anchors:
            return
        try:
            anchor = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            return  # no such family here, or no descriptor left: the next GRO socket retries
        try:
            anchor.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            anchor.close()
            _gro_anchors[family] = -1  # no UDP_GRO in this kernel: nothing to hold
            return
        _gro_anchors[family] = anchor.detach()


def _set_option(sock: socket.socket, ipv4: tuple[int, int, int],
                ipv6: list[tuple[int, int, int]], *, raising: bool = False) -> bool:
    """Set an IPv4 option, or on an IPv6 socket its IPv6 options and (for the IPv4 peers of a
    dual-stack socket, where the kernel allows it) the IPv4 one too; whether it took
    (``raising``: the kernel's refusal is raised instead)."""
    try:
        if sock.family == socket.AF_INET:
            sock.setsockopt(*ipv4)
        else:
            for option in ipv6:
                sock.setsockopt(*option)
            with contextlib.suppress(OSError):
                sock.setsockopt(*ipv4)
    except OSError:
        if raising:
            raise
        return False
    return True


def set_tos(sock: socket.socket, tos: int) -> None:
    """Mark everything ``sock`` sends with the TOS / traffic class byte ``tos``.

    Raises:
        OSError: the kernel refused it.
    """
    _set_option(sock, (IPPROTO_IP, IP_TOS, tos), [(IPPROTO_IPV6, IPV6_TCLASS, tos)],
                raising=True)


#: ``(level, type)`` of the control messages that carry a TOS / traffic class byte.
TOS_KINDS = frozenset({(IPPROTO_IP, IP_TOS), (IPPROTO_IPV6, IPV6_TCLASS)})


def enable_pktinfo(sock: socket.socket) -> bool:
    """Ask the kernel for each datagram's local address; whether it agreed."""
    return _set_option(sock, (IPPROTO_IP, IP_PKTINFO, 1), [(IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)])


def local_raw(family: int, host: str) -> bytes:
    """The local address as the receive side reports it: 4 bytes (IPv4 socket) or 16."""
    if family == socket.AF_INET:
        return socket.inet_pton(socket.AF_INET, host)
    if "." in host and ":" not in host:
        return V4_MAPPED + socket.inet_pton(socket.AF_INET, host)
    return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])


def pktinfo_ancillary(family: int, local: bytes) -> tuple[int, int, bytes]:
    """The ``(level, type, data)`` that makes a datagram leave from ``local`` (raw, as
    ``local_raw``), for ``socket.sendmsg``."""
    if family == socket.AF_INET:
        return IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, local, bytes(4))
    return IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", local, 0)


def pktinfo_cmsg(family: int, local: bytes) -> bytes:
    """The same as one whole control message (header, data, padding), for sendmmsg slots."""
    return whole_cmsg(pktinfo_ancillary(family, local))


@functools.lru_cache(maxsize=1024)  # each connection of a wildcard listener asks for its own
def whole_cmsg(ancillary: tuple[int, int, bytes]) -> bytes:
    """``(level, type, data)`` as one whole control message: header, data, padding."""
    level, kind, data = ancillary
    header = struct.pack("=" + ("Q" if _SIZE_T == 8 else "I") + "ii", CMSG_HEADER + len(data),
                         level, kind)
    header += bytes(CMSG_HEADER - len(header))
    return header + data + bytes(cmsg_space(len(data)) - CMSG_HEADER - len(data))


def tos_ancillary(tos: int, *, ipv4: bool) -> tuple[int, int, bytes]:
    """The ``(level, type, data)`` that marks one datagram's TOS / traffic class byte (DSCP
    and ECN); ``ipv4``: to an IPv4 peer, IPv4-mapped ones of a dual-stack socket included
    (IP_TOS), else IPV6_TCLASS."""
    if ipv4:
        return IPPROTO_IP, IP_TOS, struct.pack("=i", tos)
    return IPPROTO_IPV6, IPV6_TCLASS, struct.pack("=i", tos)


def enable_recvtos(sock: socket.socket) -> bool:
    """Have the kernel report each datagram's TOS / traffic class (its ECN bits)."""
    return _set_option(sock, (IPPROTO_IP, IP_RECVTOS, 1), [(IPPROTO_IPV6, IPV6_RECVTCLASS, 1)])


def _messages(control: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """Walk one message's control data: ``(level, type, data start, data end)`` each."""
    pos = 0
    end = len(control)
    size_code = "=Q" if _SIZE_T == 8 else "=I"
    while pos + CMSG_HEADER <= end:
        length = struct.unpack_from(size_code, control, pos)[0]
        if length < CMSG_HEADER:
            return
        level, kind = struct.unpack_from("=ii", control, pos + _SIZE_T)
        yield level, kind, pos + CMSG_HEADER, min(pos + length, end)
        pos += _align(length)


def parse_tos(control: bytes | memoryview) -> int:
    """The TOS / traffic class byte in one message's control data (0 when absent)."""
    for level, kind, data, end in _messages(control):
        if level == IPPROTO_IP and kind == IP_TOS and data < end:
            return int(control[data])
        if level == IPPROTO_IPV6 and kind == IPV6_TCLASS and data + 4 <= end:
            return int(struct.unpack_from("=i", control, data)[0]) & 0xFF
    return 0


def ancillaries_of(control: bytes) -> list[tuple[int, int, bytes]]:
    """Whole control messages (as ``whole_cmsg`` makes) as ``(level, type, data)`` each."""
    return [(level, kind, control[data:end]) for level, kind, data, end in _messages(control)]


def enable_recverr(sock: socket.socket) -> bool:
    """Have the kernel queue ICMP errors about this socket's datagrams, with the address each
    concerns, on the socket's error queue (read with ``read_error``); whether it agreed.

    Without it an unconnected socket never hears of them. With it, a pending error also fails
    the socket's next send, whatever its destination: the writer drains the queue and retries
    (see ``Writer``), so it never fails an unrelated send."""
    return _set_option(sock, (IPPROTO_IP, IP_RECVERR, 1), [(IPPROTO_IPV6, IPV6_RECVERR, 1)])


def set_dont_fragment(sock: socket.socket) -> bool:
    """Send with don't-fragment (as QUIC stacks do: IP_PMTUDISC_PROBE, IPV6_DONTFRAG): a
    datagram too big for the path is dropped by the router that cannot forward it, which
    reports the MTU in an ICMP "fragmentation needed" / "packet too big"; whether the kernel
    agreed."""
    return _set_option(sock, (IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE),
                       [(IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE),
                        (IPPROTO_IPV6, IPV6_DONTFRAG, 1)])


def read_error(sock: socket.socket) -> tuple[object, int, int, bytes | None, int] | None:
    """One entry of the socket's error queue: ``(address the failed datagram was sent to,
    errno, ee_info, local address or None, ee_origin)``; None when the queue is empty.

    Raises:
        OSError: reading the queue failed (not EAGAIN).
    """
    try:
        _, ancdata, _, address = sock.recvmsg(1, 512, MSG_ERRQUEUE)
    except (BlockingIOError, InterruptedError):
        return None
    code = info = origin = 0
    for level, kind, data in ancdata:
        if ((level == IPPROTO_IP and kind == IP_RECVERR)
                or (level == IPPROTO_IPV6 and kind == IPV6_RECVERR)) and len(data) >= 16:
            code, origin, _, _, _, info, _ = _EXTENDED_ERR.unpack_from(data)
    return address, code, info, local_from_ancillary(ancdata, sock.family), origin


def local_from_ancillary(ancdata: list[tuple[int, int, bytes]], family: int) -> bytes | None:
    """The local address in ``socket.recvmsg``'s ancillary data (the one-datagram path)."""
    for level, kind, data in ancdata:
        if level == IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return data[8:12] if family == socket.AF_INET else V4_MAPPED + data[8:12]
        if level == IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return data[:16]
    return None


def parse_local(control: bytes | memoryview, family: int) -> bytes | None:
    """The local address (raw, as ``local_raw``) in one message's control data, if any."""
    for level, kind, data, end in _messages(control):
        if level == IPPROTO_IP and kind == IP_PKTINFO and data + 12 <= end:
            address = bytes(control[data + 8:data + 12])
            return address if family == socket.AF_INET else V4_MAPPED + address
        if level == IPPROTO_IPV6 and kind == IPV6_PKTINFO and data + 16 <= end:
            return bytes(control[data:data + 16])
    return None


@final
class SocketState:
    """What the kernel does for one socket: each mechanism asked for once, kept off where the
    kernel refused it, and turned off later where the kernel refuses it then (GSO).

    The model is quinn-udp's ``UdpSocketState``: the receiver's arrays (``_mmsg``) are laid
    out from it (GRO runs, packet info, TOS bytes), the writer asks it how many datagrams one
    GSO send may carry and hands it each GSO failure to judge, and ``describe()`` reports it.
    The writer itself keeps only the scheduling and the grouping. A mechanism that is off
    costs nothing per datagram: its control space is not even allocated.

    ``batched``: the socket is read and written with recvmmsg/sendmmsg (GRO and GSO need it);
    ``slot_size``: the receive slot, which must hold any UDP datagram for GRO (a run of small
    datagrams can fill 64 KiB); ``named``: the socket is unconnected (each datagram carries
    its peer's address).
    """

    def __init__(self, sock: socket.socket, *, batched: bool = False, slot_size: int = 0,
                 named: bool = False, gso: bool = False, gro: bool = False,
                 pktinfo: bool = False, ecn: bool = False, recverr: bool = False,
                 dont_fragment: bool = False) -> None:
        self.sock = sock
        #: Each datagram's local address is known and each reply leaves from it (a wildcard
        #: listener): keys are (peer, local address).
        self.pktinfo = pktinfo and enable_pktinfo(sock)
        #: Each datagram's ECN codepoint is read (``ecn``), and a connection's datagrams may
        #: carry a TOS byte of their own (``conn.tos``).
        self.ecn = ecn and enable_recvtos(sock)
        #: ICMP errors about this socket's datagrams are queued on its error queue, with the
        #: address each concerns (needed on unconnected sockets, and for path MTUs).
        self.recverr = (recverr or dont_fragment) and enable_recverr(sock)
        #: Datagrams leave with don't-fragment; "too big" reports carry the path MTU.
        self.dont_fragment = dont_fragment and set_dont_fragment(sock)
        #: The kernel hands runs of equal-size datagrams as one message (UDP_GRO).
        self.gro = gro and batched and slot_size >= 65535 and enable_gro(sock)
        #: Runs of equal-size datagrams to one peer leave as one send (UDP_SEGMENT); turned
        #: off for good by the first capability refusal (``gso_failed``).
        self.gso = gso and batched and HAVE_GSO
        #: Datagrams carry control messages of their own, per message: the source address
        #: (packet info), a TOS byte (``conn.tos`` on an unconnected ECN socket).
        self.controls = self.pktinfo or (self.ecn and named)
        #: GSO sends made (tests and benchmarks read it).
        self.gso_sends = 0
        #: Whether a GSO send ever succeeded here (then EINVAL means the destination, not GSO).
        self._gso_proven = False
        self._gso_control: dict[int, list[tuple[int, int, bytes]]] = {}

    @staticmethod
    def gso_limit(size: int) -> int:
        """How many datagrams of ``size`` bytes (> 0) one GSO send may carry."""
        return min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)

    def gso_control(self, size: int) -> list[tuple[int, int, bytes]]:
        """The control messages of a GSO send of ``size``-byte segments (cached per size;
        the caller must not change the list)."""
        control = self._gso_control.get(size)
        if control is None:
            control = self._gso_control[size] = [gso_ancillary(size)]
        return control

    def gso_sent(self) -> None:
        """A GSO send succeeded: the socket can do it."""
        self._gso_proven = True
        self.gso_sends += 1

    def gso_failed(self, exc: OSError, sockaddr: bytes | None) -> None:
        """A GSO send to ``sockaddr`` (None: the connected peer) failed with ``exc``: turn
        GSO off for good (logged at WARNING) when this says "no GSO on this socket or
        device" rather than "not to this destination". A remote peer must not be able to
        switch GSO off for everyone, e.g. by sending from port 0 (then the per-datagram path
        counts that datagram's ``send_error``)."""
        if exc.errno in _GSO_REFUSALS:
            refused = True
        elif exc.errno != errno.EINVAL or self._gso_proven:
            refused = False
        else:
            # EINVAL on the first GSO send: a capability refusal unless the destination is odd.
            refused = sockaddr is None or int.from_bytes(sockaddr[2:4], "big") != 0
        if refused and self.gso:
            self.gso = False
            logger.warning("udpx: UDP GSO turned off for %r: the kernel or device refused it "
                           "(%s); sending with sendmmsg", self.sock, exc)

    def describe(self) -> dict[str, bool]:
        """The mechanisms in use, for ``describe()``."""
        return {"pktinfo": self.pktinfo, "recverr": self.recverr,
                "dont_fragment": self.dont_fragment, "ecn": self.ecn, "gso": self.gso,
                "gro": self.gro}
