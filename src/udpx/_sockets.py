"""Socket creation and options, address normalisation, peer keys and kernel drop counters."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
import socket
import struct
import sys
from typing import Any

from ._cmsg import V4_MAPPED
from ._demux import PeerKey

__all__ = [
    "Address",
    "PeerKey",
    "address_from_key",
    "bind_socket",
    "buffer_sizes",
    "ipv4_sockaddr",
    "kernel_drops",
    "key_from_address",
    "receive_memory",
    "resolve",
    "sockaddr_from_key",
]

logger = logging.getLogger("udpx")

Address = tuple[Any, ...]

# Linux constants the socket module lacks.
SO_MEMINFO = 55
_SK_MEMINFO_DROPS = 8
_SK_MEMINFO_VARS = 9
# SK_MEMINFO_RMEM_ALLOC and SK_MEMINFO_RCVBUF are its first two words.
_MEMINFO_HEAD = struct.Struct("=II")
_MEMINFO_WORD = struct.Struct("=I")

#: SO_SNDBUFFORCE and SO_RCVBUFFORCE by the option they force (the socket module lacks them):
#: Linux's generic values, which every architecture but alpha, mips, parisc and sparc uses
#: (there: none, and udpx only warns when a buffer is capped).
_FORCE_OPTIONS: dict[int, int] = (
    {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}
    if sys.platform.startswith("linux")
    and not platform.machine().startswith(("alpha", "mips", "parisc", "sparc")) else {})
#: Forcing options the kernel refused this process (no CAP_NET_ADMIN): not tried again.
_force_refused: set[int] = set()
#: The sysctls a forced buffer went past (logged once, at DEBUG).
_forced_sysctls: set[str] = set()
#: Linux caps a buffer request at INT_MAX / 2, forced or not, so that its double fits an int.
_MAX_BUFFER_REQUEST = (2**31 - 1) // 2

_IPV4_HEAD = struct.Struct("=H")  # sa_family in host order
_PORT = struct.Struct("!H")


def key_from_address(family: int, address: Address) -> PeerKey:
    """The peer key of a socket address as Python reports it, equal to the key the batch
    receiver reads from the raw sockaddr (see ``_mmsg.RecvBatch.keys``)."""
    return _key_from_sockaddr(family, sockaddr_from_address(family, address))


#: Where an IPv4 peer key starts in its sockaddr_in: bytes 2-9 (port, address, two zero
#: bytes), read as a native int. Not the family first: as an int's low bits the family is the
#: same for every peer, and a dict's first probe goes by the low bits, so every lookup among
#: thousands of peers collided through several probes (measured: 54 ns per lookup at 10,000
#: peers against 35); the port's bytes differ between most peers. (On a big-endian machine the
#: key's low bits are the two zero bytes: as correct, and as slow to look up as before.)
IPV4_KEY_OFFSET = 2
_IPV4_KEY_END = IPV4_KEY_OFFSET + 8


def _key_from_sockaddr(family: int, raw: bytes) -> PeerKey:
    if family == socket.AF_INET:
        # As the batch reader's native view reads it.
        return int.from_bytes(raw[IPV4_KEY_OFFSET:_IPV4_KEY_END], sys.byteorder)
    return raw[:28]


def sockaddr_from_address(family: int, address: Address) -> bytes:
    """The raw ``sockaddr_in``/``sockaddr_in6`` bytes of a socket address tuple."""
    host, port = address[0], address[1]
    if family == socket.AF_INET:
        return (_IPV4_HEAD.pack(socket.AF_INET) + _PORT.pack(port)
                + socket.inet_pton(socket.AF_INET, host) + bytes(8))
    scope_id = address[3] if len(address) > 3 else 0
    host = host.split("%", 1)[0]
    return (_IPV4_HEAD.pack(socket.AF_INET6) + _PORT.pack(port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope_id))


#: On a packet-info (wildcard) listener a connection's key is the peer's key joined with the
#: local address the peer sent to (``join_key``): for IPv4 the address's 4 bytes as a native
#: int above the peer's 64 bits, for IPv6 its 16 bytes after the peer's 28.
_PEER_BITS = 64
_PEER_MASK = (1 << _PEER_BITS) - 1
_IPV6_PEER = 28


def join_key(family: int, peer: PeerKey, local: bytes) -> PeerKey:
    """The key of (peer, local address ``local``, raw as ``_cmsg.local_raw``)."""
    if family == socket.AF_INET:
        assert isinstance(peer, int)
        return peer | (int.from_bytes(local, sys.byteorder) << _PEER_BITS)
    assert isinstance(peer, bytes)
    return peer + local


def split_key(family: int, key: PeerKey) -> tuple[PeerKey, bytes | None]:
    """``(peer key, raw local address or None)`` of a key (see ``join_key``)."""
    if family == socket.AF_INET:
        assert isinstance(key, int)
        local = key >> _PEER_BITS
        return key & _PEER_MASK, (local.to_bytes(4, sys.byteorder) if local else None)
    assert isinstance(key, bytes)
    return key[:_IPV6_PEER], (key[_IPV6_PEER:] or None)


def local_address(family: int, local: bytes, port: int) -> Address:
    """The socket address of a connection's local side on a packet-info listener."""
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, local), port)
    if local[:12] == V4_MAPPED:
        return ("::ffff:" + socket.inet_ntop(socket.AF_INET, local[12:]), port, 0, 0)
    return (socket.inet_ntop(socket.AF_INET6, local), port, 0, 0)


#: Bytes 2-3 of an IPv4 key's sockaddr (the port, the key's first two bytes), as bits of the
#: native-order int.
_KEY_PORT_BITS = 0xFFFF if sys.byteorder == "little" else 0xFFFF << 48


def key_has_port(key: PeerKey) -> bool:
    """Whether the port of a peer key (bytes 2-3 of its sockaddr) is not 0. Run for every new
    peer (a flood opens thousands at once): a mask, no bytes made."""
    if isinstance(key, int):
        return key & _KEY_PORT_BITS != 0
    return key[2:4] != b"\0\0"


#: A ``sockaddr_in`` from its bytes 2-9 as a native int (the family before them, zeros
#: after): the sockaddr of an IPv4 peer key without a local address part (a listener on one
#: address). One C call: run for every new peer.
ipv4_sockaddr = functools.partial(struct.Struct("=HQ6x").pack, socket.AF_INET)


def sockaddr_from_key(family: int, key: PeerKey) -> bytes:
    """The raw sockaddr to send to the peer of ``key`` (flow info cleared). Run for every new
    peer: one ``struct`` call for IPv4."""
    if family == socket.AF_INET:
        assert isinstance(key, int)
        return ipv4_sockaddr(key & _PEER_MASK)
    assert isinstance(key, bytes)
    return key[:4] + bytes(4) + key[8:28]


def address_from_key(family: int, key: PeerKey) -> Address:
    """The ``(host, port)`` (IPv4) or ``(host, port, flowinfo, scope_id)`` tuple of a key.

    Built once per new peer, never per datagram.
    """
    raw = sockaddr_from_key(family, key)
    port = _PORT.unpack_from(raw, 2)[0]
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    scope_id = struct.unpack_from("=I", raw, 24)[0]
    return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, 0, scope_id)


def address_from_sockaddr(family: int, raw: bytes) -> Address:
    """Decode a raw sockaddr (the one-datagram sender's destination)."""
    return address_from_key(family, _key_from_sockaddr(family, raw))


async def resolve(loop: asyncio.AbstractEventLoop, host: str | None, port: int,
                  passive: bool) -> tuple[int, Address]:
    """``(family, address)`` for ``host``/``port``, resolved without blocking the loop.

    ``host=None`` with ``passive`` is every interface: IPv6 dual-stack where the machine has
    IPv6, else IPv4.

    Raises:
        ValueError: the port is out of range.
        socket.gaierror: the host cannot be resolved.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int between 0 and 65535, got {port!r}")
    if host is None:
        if passive and socket.has_ipv6 and _ipv6_usable():
            return socket.AF_INET6, ("::", port, 0, 0)
        return socket.AF_INET, ("0.0.0.0" if passive else "127.0.0.1", port)
    if not isinstance(host, str):
        raise ValueError(f"host must be a str or None, got {host!r}")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
        except OSError:
            continue
        if family == socket.AF_INET6 and "%" in host:
            # A scoped address ("fe80::1%eth0"): the libc resolves the scope without any
            # lookup (AI_NUMERICHOST never blocks). Not through the loop: uvloop's
            # getaddrinfo drops the scope id, and binding fe80:: without one fails (EINVAL).
            infos = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0,
                                       socket.AI_NUMERICHOST)
            return socket.AF_INET6, infos[0][4]
        return family, ((host, port) if family == socket.AF_INET else (host, port, 0, 0))
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                   flags=socket.AI_PASSIVE if passive else 0)
    for family, _, _, _, address in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return family, address
    raise socket.gaierror(f"no IPv4 or IPv6 address for {host!r}")


def _ipv6_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM):
            return True
    except OSError:
        return False


def bind_socket(family: int, address: Address | None, *, connect_to: Address | None = None,
                reuse_port: bool = False, reuse_addr: bool = False,
                rcvbuf: int | None = None, sndbuf: int | None = None) -> socket.socket:
    """A non-blocking UDP socket, options set, bound and (for ``connect_to``) connected.

    The socket is closed again if any step fails.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6 and address is not None and (
                address[0] in ("::", "") or str(address[0]).startswith("::ffff:")):
            # Dual stack for "all interfaces", as Go's net.ListenUDP does.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if reuse_addr:
            # Connected mode: per-peer sockets share the listener's address (see _listener).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_buffers(sock, rcvbuf, sndbuf)
        if address is not None:
            sock.bind(address)
        if connect_to is not None:
            sock.connect(connect_to)
    except BaseException:
        sock.close()
        raise
    return sock


_warned_sysctls: set[str] = set()


def _read_sysctl(name: str) -> int | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def set_buffers(sock: socket.socket, rcvbuf: int | None, sndbuf: int | None) -> None:
    """Request the socket buffer sizes that are not None: in full where the process may
    (CAP_NET_ADMIN), else as far as the sysctl allows, warning once when capped."""
    if rcvbuf is not None:
        _set_buffer(sock, socket.SO_RCVBUF, "rcvbuf", rcvbuf, "net.core.rmem_max")
    if sndbuf is not None:
        _set_buffer(sock, socket.SO_SNDBUF, "sndbuf", sndbuf, "net.core.wmem_max")


def _set_buffer(sock: socket.socket, option: int, name: str, requested: int,
                sysctl: str) -> None:
    """Request a socket buffer size; past the sysctl's cap, force it where the process may;
    warn once per process when the kernel capped it."""
    sock.setsockopt(socket.SOL_SOCKET, option, requested)
    granted = sock.getsockopt(socket.SOL_SOCKET, option)
    # Linux doubles the request (bookkeeping overhead) after capping it at the sysctl and at
    # INT_MAX / 2 (so that the double fits an int).
    full = 2 * min(requested, _MAX_BUFFER_REQUEST)
    if granted >= full:
        return
    force = _FORCE_OPTIONS.get(option)
    if force is not None and force not in _force_refused:
        # SO_RCVBUFFORCE/SO_SNDBUFFORCE ignore the sysctl, for a process with CAP_NET_ADMIN
        # (root, usually): what was asked for is what a server sized its load by. An extra:
        # any refusal (no capability, a sandbox's filter) leaves the capped size, and is not
        # asked again (a connected-mode listener sets the buffers of every new peer's socket).
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, requested)
        except OSError:
            _force_refused.add(force)
        else:
            granted = sock.getsockopt(socket.SOL_SOCKET, option)
            if granted >= full:
                if sysctl not in _forced_sysctls:
                    _forced_sysctls.add(sysctl)
                    logger.debug("udpx: %s of %d bytes granted past %s (CAP_NET_ADMIN)",
                                 name, requested, sysctl)
                return
    # Capped. Warned already: no file to read (a connected-mode listener sets the buffers of
    # every new peer's socket).
    if sysctl in _warned_sysctls:
        return
    _warned_sysctls.add(sysctl)
    limit = _read_sysctl(sysctl)
    logger.warning(
        "udpx: %s of %d bytes requested, which the kernel doubles for its bookkeeping: it "
        "granted %d of those %d, capped by %s%s; raise it with: sysctl -w %s=%d%s", name,
        requested, granted, full, sysctl, f" = {limit}" if limit is not None else "", sysctl,
        requested, " (or run with CAP_NET_ADMIN, which udpx then uses to grant it in full)"
        if force is not None else "")


def buffer_sizes(sock: socket.socket) -> tuple[int, int]:
    """The receive and send buffer sizes the kernel granted."""
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


def kernel_drops(sock: socket.socket) -> int:
    """The kernel's count of datagrams dropped for this socket (SK_MEMINFO_DROPS), 0 where
    the platform does not report it."""
    memory = receive_memory(sock)
    return memory[2] if memory is not None else 0


def receive_memory(sock: socket.socket) -> tuple[int, int, int] | None:
    """What the socket's receive queue holds now, in bytes as the kernel charges them (each
    datagram's buffer, several hundred bytes above its payload), the buffer's size in the same
    bytes, and the kernel's drop count (SO_MEMINFO); None where the platform does not say."""
    if sock.fileno() < 0:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * _SK_MEMINFO_VARS)
    except OSError:
        return None
    if len(raw) < 4 * (_SK_MEMINFO_DROPS + 1):
        return None
    queued, size = _MEMINFO_HEAD.unpack_from(raw)
    return queued, size, int(_MEMINFO_WORD.unpack_from(raw, 4 * _SK_MEMINFO_DROPS)[0])


def is_ipv4(address: Address) -> bool:
    """Whether a socket address is an IPv4 one, IPv4-mapped IPv6 ones included."""
    host = str(address[0])
    return len(address) == 2 or (host.startswith("::ffff:") and "." in host)


def max_payload(family: int, peer: Address | None) -> int:
    """The largest datagram the address family allows (IPv4-mapped IPv6 peers count as IPv4)."""
    if family == socket.AF_INET or (peer is not None and is_ipv4(peer)):
        return 65507
    return 65527
