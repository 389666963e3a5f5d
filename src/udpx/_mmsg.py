"""ctypes binding to recvmmsg/sendmmsg, with preallocated batch arrays. ctypes only.

Each socket owns one ``RecvBatch`` and one ``SendBatch``: contiguous arrays of ``mmsghdr``,
``iovec`` and ``sockaddr_storage`` plus a payload arena, allocated once and reused for every
call. Per-datagram results (lengths, flags, peer addresses) are read in bulk, once per batch,
through memoryview casts and ``tolist()``; nothing in the hot path touches a ctypes attribute.

Payload arenas are anonymous ``mmap`` regions: 64 slots of 64 KiB cost 4 MiB of address space but
only the pages the kernel actually writes become resident, so small datagrams stay cheap.

Where libc has no recvmmsg (not Linux) or ``batch_size`` is 1, ``SingleRecv``/``SingleSend``
offer the same interface with one ``recvmsg_into``/``send`` per datagram into a preallocated
buffer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate, repeat
from operator import add, lshift, or_
from typing import TYPE_CHECKING, Any, Literal

from ._cmsg import (
    IP_PKTINFO,
    IPPROTO_IP,
    IPPROTO_IPV6,
    IPV6_PKTINFO,
    SOL_UDP,
    UDP_GRO,
    V4_MAPPED,
    SocketState,
    ancillaries_of,
    cmsg_space,
    local_from_ancillary,
    parse_local,
    parse_tos,
)
from ._queue import BYTES_DATA_OFFSET
from ._sockets import IPV4_KEY_OFFSET, join_key

if TYPE_CHECKING:
    from ._demux import PeerKey
    from ._queue import TxAccount

__all__ = [
    "HAVE_MMSG",
    "MSG_TRUNC",
    "Receiver",
    "RecvBatch",
    "SendBatch",
    "Sender",
    "SingleRecv",
    "SingleSend",
    "make_receiver",
    "make_sender",
    "slice_all",
]

# A plain int: socket.MSG_TRUNC is an IntFlag, whose "&" costs a Python-level call.
MSG_TRUNC: int = int(getattr(socket, "MSG_TRUNC", 0x20))
SOCKADDR_SIZE = 128  # sizeof(struct sockaddr_storage)
_KEY_CACHE_SIZE = 4096  # peers whose key the one-datagram receiver remembers

# UDP generic receive offload (_cmsg.enable_gro): the kernel hands a run of equal-size datagrams
# from one peer (sent with GSO, or coalesced by the NIC) to recvmmsg as ONE message, with the
# segment size in a control message; udpx splits it again. The kernel's per-message receive
# cost is paid once per run instead of once per datagram.
_SOCKADDR_IN6_SIZE = 28


class _IOVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    # glibc's layout: size_t for msg_iovlen and msg_controllen.
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint))


_HDR_SIZE = ctypes.sizeof(_MMsgHdr)
_IOV_SIZE = ctypes.sizeof(_IOVec)
# Positions, in 32-bit words, of msg_len and msg_flags inside one mmsghdr, and the stride.
_U32_STRIDE = _HDR_SIZE // 4
_U32_LEN = _MMsgHdr.msg_len.offset // 4
_U32_FLAGS = _MsgHdr.msg_flags.offset // 4
# iov_len in size_t words inside the iovec array.
_SIZE_T_CODE: Literal["I", "L", "Q"] = (
    "I" if ctypes.sizeof(ctypes.c_size_t) == 4 else "L" if array("L").itemsize == 8 else "Q")
_IOV_WORDS = _IOV_SIZE // ctypes.sizeof(ctypes.c_size_t)
# msg_controllen in size_t words inside one mmsghdr, and the stride.
_SIZE_T = ctypes.sizeof(ctypes.c_size_t)
_WORD_STRIDE = _HDR_SIZE // _SIZE_T
_WORD_CONTROLLEN = _MsgHdr.msg_controllen.offset // _SIZE_T
_WORD_NAME = _MsgHdr.msg_name.offset // _SIZE_T


_WORD_IOV = _MsgHdr.msg_iov.offset // _SIZE_T
_WORD_IOVLEN = _MsgHdr.msg_iovlen.offset // _SIZE_T
_WORD_CONTROL = _MsgHdr.msg_control.offset // _SIZE_T
_U32_NAMELEN = _MsgHdr.msg_namelen.offset // 4


def _strided(start: int, count: int, step: int) -> array[int]:
    """``count`` size_t values from ``start`` on, ``step`` apart (addresses of array items)."""
    return array(_SIZE_T_CODE, range(start, start + count * step, step)) if step else array(
        _SIZE_T_CODE, [start]) * count


def _lay_out(hdrs: ctypes.Array[Any], iovs: ctypes.Array[Any], count: int, *,
             base: int | None, slot: int, names: int | None, namelen: int,
             controls: int | None, control_size: int, control_len: bool) -> None:
    """Point each of ``count`` headers at its iovec (one each), each iovec at ``base +
    i * slot`` (``base`` None: left for the sender to set), each header at its name
    (``names`` + i * ``namelen``, or only the length with ``names`` 0, None: none) and its
    control space: strided slice assignments, not a Python step per header (a connected-mode
    listener makes a sender for every new peer)."""
    words = memoryview(hdrs).cast("B").cast(_SIZE_T_CODE)
    u32 = memoryview(hdrs).cast("B").cast("I")
    try:
        end = count * _WORD_STRIDE
        words[_WORD_IOV:end:_WORD_STRIDE] = _strided(ctypes.addressof(iovs), count, _IOV_SIZE)
        words[_WORD_IOVLEN:end:_WORD_STRIDE] = _strided(1, count, 0)
        if names is not None:
            if names:
                words[_WORD_NAME:end:_WORD_STRIDE] = _strided(names, count, namelen)
            u32[_U32_NAMELEN:count * _U32_STRIDE:_U32_STRIDE] = array("I", [namelen]) * count
        if controls is not None:
            words[_WORD_CONTROL:end:_WORD_STRIDE] = _strided(controls, count, control_size)
            if control_len:
                words[_WORD_CONTROLLEN:end:_WORD_STRIDE] = _strided(control_size, count, 0)
        if base is not None:
            iov_words = memoryview(iovs).cast("B").cast(_SIZE_T_CODE)
            try:
                iov_words[0:count * _IOV_WORDS:_IOV_WORDS] = _strided(base, count, slot)
                iov_words[1:count * _IOV_WORDS:_IOV_WORDS] = _strided(slot, count, 0)
            finally:
                iov_words.release()
    finally:
        words.release()
        u32.release()


def _cmsg_align(length: int) -> int:
    return (length + _SIZE_T - 1) & ~(_SIZE_T - 1)


# One control message carrying an int (struct cmsghdr: size_t cmsg_len, int level, int type):
# its space per slot, and the positions of level, type and data in 32-bit words.
_CMSG_HEADER = _cmsg_align(_SIZE_T + 8)
_CONTROL_SIZE = _CMSG_HEADER + _cmsg_align(4)
_CMSG_LEVEL = _SIZE_T // 4
_CMSG_TYPE = _CMSG_LEVEL + 1
_CMSG_DATA = _CMSG_HEADER // 4
#: Control space per slot when the socket reports packet info (room for GRO's and PKTINFO's
#: messages together, with margin): a power of two, so slots are a fixed stride of words.
_PKTINFO_CONTROL_SIZE = 128


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no dynamic libc at all
        return None
    if not (hasattr(libc, "recvmmsg") and hasattr(libc, "sendmmsg")):
        return None  # pragma: no cover - not Linux
    return libc


_libc = _load_libc()
#: Whether this platform has recvmmsg/sendmmsg.
HAVE_MMSG = _libc is not None
# No argtypes on purpose: a call with argtypes costs about twice as much, and every argument
# passed is a ctypes object (pointer-sized) or a small int that fits a C int.
_recvmmsg = _libc.recvmmsg if _libc is not None else None
_sendmmsg = _libc.sendmmsg if _libc is not None else None
_get_errno = ctypes.get_errno


def _raise_errno(err: int) -> None:
    # OSError(errno, ...) picks the matching subclass (ConnectionRefusedError, ...).
    raise OSError(err, os.strerror(err))


def _anonymous_arena(size: int) -> tuple[mmap.mmap, int, ctypes.c_char]:
    arena = mmap.mmap(-1, max(size, 1))
    anchor = ctypes.c_char.from_buffer(arena)  # keeps the address valid; released on close
    return arena, ctypes.addressof(anchor), anchor


def peer_keys_ipv4(names_view: memoryview, count: int) -> list[int]:
    """IPv4 peer keys, from a view of the names arena as native 8-byte ints starting at
    byte ``IPV4_KEY_OFFSET`` (one sockaddr_storage, 16 ints, per message)."""
    return names_view[0:count * 16:16].tolist()


def split_segments(keys: Sequence[PeerKey] | None, offsets: Sequence[int],
                   lengths: Sequence[int], sizes: Sequence[int],
                   ) -> tuple[list[PeerKey] | None, list[int], list[int]]:
    """Expand messages carrying GRO runs (``sizes[i] > 0``: segments of that size, the last
    one possibly shorter) into one entry per datagram. ``keys`` may be None (connected)."""
    out_keys: list[PeerKey] | None = [] if keys is not None else None
    out_offsets: list[int] = []
    out_lengths: list[int] = []
    for index, (offset, length, size) in enumerate(zip(offsets, lengths, sizes)):
        if size and length > size:
            end = offset + length
            starts = range(offset, end, size)
            pieces = len(starts)
            out_offsets.extend(starts)
            out_lengths.extend([size] * (pieces - 1))
            out_lengths.append(end - starts[-1])
            if out_keys is not None and keys is not None:
                out_keys.extend([keys[index]] * pieces)
        else:
            out_offsets.append(offset)
            out_lengths.append(length)
            if out_keys is not None and keys is not None:
                out_keys.append(keys[index])
    return out_keys, out_offsets, out_lengths


def slice_all(arena: Any, offsets: Sequence[int], lengths: Sequence[int]) -> list[bytes]:
    """The datagrams ``arena[offsets[i]:offsets[i] + lengths[i]]``, one C-level pass."""
    return list(map(arena.__getitem__, map(slice, offsets, map(add, offsets, lengths))))


#: Uniform-length batches decoded by one ``struct`` call (see ``RecvBatch.datagrams``): at
#: most this many compiled layouts are kept per receiver (one per length and count seen).
UNIFORM_LAYOUTS = 256


def message_datagrams(arena: Any, offset: int, length: int, size: int) -> list[bytes]:
    """The datagrams of one received message: itself, or its GRO run split (``size > 0``).
    For the one-message-at-a-time slow paths; batches go through ``RecvBatch.split``."""
    _, offsets, lengths = split_segments(None, [offset], [length], [size])
    return slice_all(arena, offsets, lengths)


class RecvBatch:
    """Preallocated arrays for one socket's recvmmsg calls.

    After ``receive(fd)`` returned ``n > 0``, datagram ``i < n`` is
    ``arena[offsets[i]:offsets[i] + lengths(n)[i]]``, from the peer ``keys(n)[i]``.
    """

    def __init__(self, batch_size: int, slot_size: int, family: int, named: bool, *,
                 gro: bool = False, pktinfo: bool = False, tos: bool = False) -> None:
        if _libc is None:  # pragma: no cover - checked by make_receiver
            raise OSError(errno.ENOSYS, "recvmmsg is not available")
        self.size = batch_size
        #: Messages asked for per call, at most ``size``: the reader lowers it while GRO
        #: messages carry many datagrams each (see ``BatchReader._read``).
        self.vlen = batch_size
        #: Whether the socket reports each datagram's local address (IP_PKTINFO set): keys
        #: are then (peer, local address), see ``_sockets.join_key``.
        self.pktinfo = pktinfo
        #: Whether the socket reports each datagram's TOS byte (``codepoints``).
        self.tos = tos
        #: Whether the socket has UDP_GRO set (the caller sets it), so messages may carry runs.
        self.gro = gro
        #: Datagrams split out of GRO messages (tests and benchmarks read it).
        self.gro_segments = 0
        self.slot_size = slot_size
        self.family = family
        #: recvmmsg calls made (the batching test counts them).
        self.calls = 0
        self.arena, arena_address, self._arena_anchor = _anonymous_arena(batch_size * slot_size)
        self.offsets = [index * slot_size for index in range(batch_size)]
        self._names, names_address, self._names_anchor = _anonymous_arena(
            batch_size * SOCKADDR_SIZE)
        self.name_offsets = [index * SOCKADDR_SIZE for index in range(batch_size)]
        self._iovs = (_IOVec * batch_size)()
        self._hdrs = (_MMsgHdr * batch_size)()
        control_size = _PKTINFO_CONTROL_SIZE if pktinfo or tos else _CONTROL_SIZE
        gro_or_more = gro or pktinfo or tos
        self._control_stride = control_size // 4
        self._controls, controls_address, self._controls_anchor = _anonymous_arena(
            control_size * batch_size if gro_or_more else 1)
        _lay_out(self._hdrs, self._iovs, batch_size, base=arena_address, slot=slot_size,
                 names=names_address if named else None, namelen=SOCKADDR_SIZE,
                 controls=controls_address if gro_or_more else None,
                 control_size=control_size, control_len=True)
        self._control_words = memoryview(self._controls).cast("i") if gro_or_more else None
        # Unsigned, for IPv4 addresses read as native ints (as _sockets.join_key makes them).
        self._control_uwords = memoryview(self._controls).cast("I") if pktinfo else None
        self._control_offsets = [index * control_size for index in range(batch_size)]
        # Where PKTINFO's address sits when it is a slot's first message: IPv4's ipi_addr (8
        # bytes into in_pktinfo), IPv6's ipi6_addr (at the start of in6_pktinfo).
        # (Made only for a packet-info socket, the only one that reads them.)
        self._v4_local_slices = [slice(offset + _CMSG_HEADER + 8, offset + _CMSG_HEADER + 12)
                                 for offset in self._control_offsets] if pktinfo else []
        self._v6_local_slices = [slice(offset + _CMSG_HEADER, offset + _CMSG_HEADER + 16)
                                 for offset in self._control_offsets] if pktinfo else []
        self._hdr_size_words = memoryview(self._hdrs).cast("B").cast(_SIZE_T_CODE)
        # The kernel rewrites msg_namelen, msg_controllen, msg_flags and msg_len; a pristine
        # copy restores the used headers with one memmove per batch.
        self._template = ctypes.create_string_buffer(bytes(self._hdrs), _HDR_SIZE * batch_size)
        self._used = 0
        self._words = memoryview(self._hdrs).cast("B").cast("I")
        self._names_from_key = memoryview(self._names)[
            IPV4_KEY_OFFSET:IPV4_KEY_OFFSET + batch_size * SOCKADDR_SIZE - 8]
        self._names_q = self._names_from_key.cast("Q")
        # Batch decoders for uniform lengths, by (length, count): see ``datagrams``; GRO run
        # decoders, by (segment size, segments, last segment's size): see ``split``.
        self._uniform: dict[tuple[int, int], Any] = {}
        self._runs: dict[tuple[int, int, int], Any] = {}
        self._closed = False

    def receive(self, fd: int) -> int:
        """One recvmmsg call. Returns the number of datagrams received, 0 on EAGAIN.

        Raises:
            OSError: any error other than EAGAIN/EINTR, with its errno.
        """
        if self._used:
            ctypes.memmove(self._hdrs, self._template, self._used * _HDR_SIZE)
        while True:
            count: int = _recvmmsg(fd, self._hdrs, self.vlen, 0, None)  # type: ignore[misc]
            self.calls += 1
            if count >= 0:
                self._used = count
                return count
            err = _get_errno()
            if err == errno.EINTR:
                continue
            self._used = 0
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            _raise_errno(err)

    def lengths(self, count: int) -> list[int]:
        return self._words[_U32_LEN:_U32_LEN + count * _U32_STRIDE:_U32_STRIDE].tolist()

    def flags(self, count: int) -> list[int]:
        return self._words[_U32_FLAGS:_U32_FLAGS + count * _U32_STRIDE:_U32_STRIDE].tolist()

    def datagrams(self, lengths: list[int]) -> Sequence[bytes]:
        """The received messages' payloads as ``bytes``, in slot order (``lengths`` as
        ``lengths()`` gave them; GRO runs are not split here).

        Hot path. When every message has the same length, the usual batch of a peer or of
        many peers running one protocol, one ``struct`` call with a layout compiled once for
        that length makes all the ``bytes`` objects in C: about 25 ns each, against 300 for a
        slice object, an addition and a subscript each (measured, 64 B, 64 slots).
        """
        count = len(lengths)
        first = lengths[0]
        if lengths.count(first) != count:
            return slice_all(self.arena, self.offsets, lengths)
        key = (first, count)
        unpack = self._uniform.get(key)
        if unpack is None:
            unpack = self._uniform_layout(first, count)
        result: tuple[bytes, ...] = unpack(self.arena)
        return result

    def _uniform_layout(self, length: int, count: int) -> Any:
        """The decoder of ``count`` slots holding ``length`` bytes each: each slot's payload,
        then its unused rest skipped."""
        layouts = self._uniform
        if len(layouts) >= UNIFORM_LAYOUTS:
            layouts.clear()
        skip = self.slot_size - length
        unpack = layouts[(length, count)] = struct.Struct(
            "=" + f"{length}s{skip}x" * (count - 1) + f"{length}s").unpack_from
        return unpack

    def truncated(self, count: int) -> list[bool] | None:
        """None when no datagram of the batch was truncated (the common case), else a mask."""
        flags = self.flags(count)
        if not any(flags):
            return None
        return [bool(flag & MSG_TRUNC) for flag in flags]

    def segment_sizes(self, count: int) -> list[int] | None:
        """Per message, the GRO segment size (0: a single datagram); None when no message of
        the batch carries a run (always, without GRO)."""
        words = self._control_words
        if words is None or not self.gro:
            return None
        used = self._control_lengths(count)
        if not any(used):
            return None
        stride = self._control_stride
        end = count * stride
        # The kernel puts UDP_GRO's message first, before any packet info. A packet-info or
        # ECN socket has control data on every message: without a GRO run in the batch (one C
        # scan says so) there is nothing to split, and no per-message work.
        types = words[_CMSG_TYPE:end:stride].tolist()
        if UDP_GRO not in types:
            return None
        levels = words[_CMSG_LEVEL:end:stride].tolist()
        sizes = words[_CMSG_DATA:end:stride].tolist()
        sizes = [size if length and level == SOL_UDP and kind == UDP_GRO else 0
                 for length, level, kind, size in zip(used, levels, types, sizes)]
        return sizes if any(sizes) else None

    def split(self, keys: Sequence[PeerKey] | None, lengths: list[int], sizes: list[int],
              ) -> tuple[list[PeerKey] | None, list[bytes], list[int]]:
        """Expand GRO messages into their datagrams: ``(keys, datagrams, lengths)`` per
        datagram, in order.

        Hot path of udpx-to-udpx traffic (GSO senders). A run's segments lie end to end in
        its slot, so one ``struct`` call with a layout compiled once per (segment size,
        segments, last segment's size) makes all of its ``bytes`` objects; a listener whose
        queue can take only part of a batch still pays ~25 ns for each one it then drops.
        """
        arena = self.arena
        runs = self._runs
        out_keys: list[PeerKey] | None = [] if keys is not None else None
        datagrams: list[bytes] = []
        out_lengths: list[int] = []
        split = 0
        for index, (offset, length, size) in enumerate(zip(self.offsets, lengths, sizes)):
            if size and length > size:
                pieces = -(-length // size)
                last = length - (pieces - 1) * size
                unpack = runs.get((size, pieces, last))
                if unpack is None:
                    unpack = self._run_layout(size, pieces, last)
                datagrams.extend(unpack(arena, offset))
                out_lengths.extend(repeat(size, pieces - 1))
                out_lengths.append(last)
                split += pieces
                if out_keys is not None and keys is not None:
                    out_keys.extend(repeat(keys[index], pieces))
            else:
                datagrams.append(arena[offset:offset + length])
                out_lengths.append(length)
                if out_keys is not None and keys is not None:
                    out_keys.append(keys[index])
        self.gro_segments += split
        return out_keys, datagrams, out_lengths

    def _run_layout(self, size: int, pieces: int, last: int) -> Any:
        """The decoder of one GRO run: ``pieces`` segments end to end, the last ``last``
        bytes long."""
        runs = self._runs
        if len(runs) >= UNIFORM_LAYOUTS:
            runs.clear()
        unpack = runs[(size, pieces, last)] = struct.Struct(
            "=" + f"{size}s" * (pieces - 1) + f"{last}s").unpack_from
        return unpack

    def keys(self, count: int) -> Sequence[PeerKey]:
        if self.family == socket.AF_INET:
            peers: list[Any] = peer_keys_ipv4(self._names_q, count)
        else:
            names = self._names
            peers = [names[offset:offset + _SOCKADDR_IN6_SIZE]
                     for offset in self.name_offsets[:count]]
        if not self.pktinfo:
            return peers
        # Packet info: each key joins the local address the peer sent to (see
        # _sockets.join_key), in C-level maps when every slot's first control message is the
        # packet info (no GRO run in the batch), else message by message.
        locals_ = self._local_addresses(count)
        if self.family == socket.AF_INET:
            first = locals_[0]
            if locals_.count(first) == count:  # one local address (the common batch)
                return list(map(or_, peers, repeat(first << 64, count)))
            return list(map(or_, peers, map(lshift, locals_, repeat(64))))
        return list(map(add, peers, locals_))

    def _control_lengths(self, count: int) -> list[int]:
        """Each message's control data length, as the kernel set it."""
        return self._hdr_size_words[
            _WORD_CONTROLLEN:_WORD_CONTROLLEN + count * _WORD_STRIDE:_WORD_STRIDE].tolist()

    def codepoints(self, count: int) -> list[int]:
        """Each message's ECN codepoint (the TOS byte's low two bits; 0: not ECN-capable),
        parsed message by message (``ecn`` is opt-in)."""
        used = self._control_lengths(count)
        controls = self._controls
        return [parse_tos(controls[offset:offset + length]) & 3 if length else 0
                for offset, length in zip(self._control_offsets, used)]

    def _local_addresses(self, count: int) -> list[Any]:
        words = self._control_words
        assert words is not None
        stride = self._control_stride
        end = count * stride
        levels = words[_CMSG_LEVEL:end:stride].tolist()
        types = words[_CMSG_TYPE:end:stride].tolist()
        controls = self._controls
        if self.family == socket.AF_INET:
            if levels.count(IPPROTO_IP) == count and types.count(IP_PKTINFO) == count:
                uwords = self._control_uwords
                assert uwords is not None
                return uwords[_CMSG_DATA + 2:end:stride].tolist()  # ipi_addr, native order
        elif levels.count(IPPROTO_IPV6) == count and types.count(IPV6_PKTINFO) == count:
            return list(map(controls.__getitem__, self._v6_local_slices[:count]))
        elif levels.count(IPPROTO_IP) == count and types.count(IP_PKTINFO) == count:
            # A dual-stack socket's IPv4 datagrams: IPv4-mapped local addresses.
            return list(map(add, repeat(V4_MAPPED, count),
                            map(controls.__getitem__, self._v4_local_slices[:count])))
        used = self._control_lengths(count)
        result: list[Any] = []
        for offset, length in zip(self._control_offsets, used):
            local = parse_local(controls[offset:offset + length], self.family)
            if self.family == socket.AF_INET:
                result.append(int.from_bytes(local, sys.byteorder) if local else 0)
            else:
                result.append(local or b"")
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._words.release()
        self._names_q.release()
        self._names_from_key.release()
        self._hdr_size_words.release()
        if self._control_words is not None:
            self._control_words.release()
        if self._control_uwords is not None:
            self._control_uwords.release()
        del self._arena_anchor, self._names_anchor, self._controls_anchor
        self._controls.close()
        self.arena.close()
        self._names.close()


class SingleRecv:
    """The one-datagram-per-syscall receiver, same interface as ``RecvBatch``.

    Uses ``recvmsg_into`` on a preallocated buffer (never asyncio's 256 KiB ``recvfrom``) so
    that MSG_TRUNC is reported as with recvmmsg. After ``receive`` returned 1, ``data`` is the
    datagram (None if it was truncated) and ``key`` its peer key: owners that know they have a
    single receiver read those rather than the one-item lists of the batch interface.
    """

    size = vlen = 1
    gro = False
    gro_segments = 0

    def __init__(self, sock: socket.socket, slot_size: int, key_of: Any, *,
                 pktinfo: bool = False) -> None:
        self._sock = sock
        #: Packet info: keys join the local address (see RecvBatch.keys).
        self.pktinfo = pktinfo
        self.slot_size = slot_size
        self.calls = 0
        self._buffer = bytearray(slot_size)
        self._views = [memoryview(self._buffer)]
        self.offsets = [0]
        self.data: bytes | None = None
        self.key: PeerKey | None = None
        self._length = 0
        self._key_of = key_of
        self._keys: dict[Any, PeerKey] = {}

    @property
    def arena(self) -> bytes:
        return self.data or b""

    def receive(self, fd: int) -> int:
        # Hot path of the one-datagram receiver.
        while True:
            self.calls += 1
            try:
                if not self.pktinfo:
                    nbytes, ancdata, flags, address = self._sock.recvmsg_into(self._views)
                else:
                    nbytes, ancdata, flags, address = self._sock.recvmsg_into(
                        self._views, _PKTINFO_CONTROL_SIZE)
            except InterruptedError:
                continue
            except BlockingIOError:
                return 0
            break
        self._length = nbytes
        self.data = None if flags & MSG_TRUNC else self._views[0][:nbytes].tobytes()
        if self._key_of is not None:
            # Computing a key from an address tuple costs about 1 us: remember recent peers.
            key = self._keys.get(address)
            if key is None:
                if len(self._keys) >= _KEY_CACHE_SIZE:
                    self._keys.clear()
                key = self._keys[address] = self._key_of(address)
            if self.pktinfo:
                local = local_from_ancillary(ancdata, self._sock.family)
                if local is not None:
                    key = join_key(self._sock.family, key, local)
            self.key = key
        return 1

    def lengths(self, count: int) -> list[int]:
        return [self._length]

    def truncated(self, count: int) -> list[bool] | None:
        return [True] if self.data is None else None

    def keys(self, count: int) -> Sequence[PeerKey]:
        return [self.key] if self.key is not None else []

    def segment_sizes(self, count: int) -> list[int] | None:
        return None  # no GRO on the one-datagram path

    def close(self) -> None:
        self._views[0].release()


class SendBatch:
    """Preallocated arrays for one socket's sendmmsg calls.

    ``fill(datagrams, owners)`` copies a batch's payloads end to end into the arena (one join
    in C, cheaper than working out where each payload's bytes are) and points each message at
    its owner's sockaddr (immutable bytes that its account keeps, the same from batch to
    batch); ``send(fd, start)`` sends ``fill``'s datagrams from index
    ``start`` on and returns how many the kernel took. Where ``id()`` is not an address (not
    CPython), ``make_sender`` gives an unconnected socket the one-datagram sender instead.
    """

    def __init__(self, batch_size: int, slot_size: int, named: bool, namelen: int, *,
                 control_space: int = 0, arena_slots: int | None = None) -> None:
        if _libc is None:  # pragma: no cover - checked by make_sender
            raise OSError(errno.ENOSYS, "sendmmsg is not available")
        self.size = batch_size
        #: Payload bytes one batch may hold (``arena_slots`` datagrams of ``slot_size``, by
        #: default one per message): a caller with more messages than that per batch (a
        #: listener's) passes at most this many bytes to ``fill``.
        self.capacity = (arena_slots or batch_size) * slot_size
        #: A writer is between its fill and the end of its sends (see ``_writer.Sender``).
        self.busy = False
        #: Control bytes per slot (a packet-info socket's source address), 0: none.
        self.control_space = control_space
        self.calls = 0
        # The payloads of a batch lie end to end at the arena's start (see fill).
        self.arena, self._arena_address, self._arena_anchor = _anonymous_arena(self.capacity)
        #: (size, count) of the last batch when all its datagrams had one size: the iovecs
        #: already point where a batch of that layout lies (None: they do not).
        self._layout: tuple[int, int] | None = None
        self._uniform_bases: dict[int, array[int]] = {}
        self._iovs = (_IOVec * batch_size)()
        self._hdrs = (_MMsgHdr * batch_size)()
        self._controls, controls_address, self._controls_anchor = _anonymous_arena(
            batch_size * control_space)
        self.control_offsets = [index * control_space for index in range(batch_size)]
        # The iovecs are pointed by fill(); msg_name is set per datagram by fill() too (its
        # account's sockaddr), msg_controllen per batch.
        _lay_out(self._hdrs, self._iovs, batch_size, base=None, slot=0,
                 names=0 if named else None, namelen=namelen,
                 controls=controls_address if control_space else None,
                 control_size=control_space, control_len=False)
        self._iov_words = memoryview(self._iovs).cast("B").cast(_SIZE_T_CODE)
        self._hdr_words = memoryview(self._hdrs).cast("B").cast(_SIZE_T_CODE)
        self._count = 0
        self._closed = False

    def fill(self, datagrams: Sequence[bytes], owners: Sequence[TxAccount] | None,
             controls: Sequence[bytes] | None = None) -> int:
        """Copy at most ``size`` datagrams into the arrays, each addressed to its owner's
        sockaddr (``owners``: None on a connected socket), and on a packet-info socket with
        its control messages (b"" for none). The owners must stay alive until the send."""
        # Hot path, with no Python-level step per datagram: the payloads are joined in C and
        # copied to the arena's start in one go (a batch of small datagrams then touches one
        # page, not one per slot), the iovecs pointed at them, and the destinations (pointers
        # to the owners' sockaddr bytes, no copy) written in one go. The caller passes at most
        # ``size`` datagrams.
        count = len(datagrams)
        if not count:
            self._count = 0
            return 0
        sizes = list(map(len, datagrams))
        payload = b"".join(datagrams)
        self.arena[:len(payload)] = payload
        first = sizes[0]
        # The usual batch has every datagram the same size (one protocol's messages): the
        # iovecs stay as they are while batches keep that layout.
        layout = (first, count) if sizes.count(first) == count else None
        if layout is None or layout != self._layout:
            self._layout = layout
            words = self._iov_words
            words[0:count * _IOV_WORDS:_IOV_WORDS] = (
                self._bases(first)[:count] if layout is not None else
                array(_SIZE_T_CODE, list(accumulate(sizes[:-1], initial=self._arena_address))))
            words[1:1 + count * _IOV_WORDS:_IOV_WORDS] = array(_SIZE_T_CODE, sizes)
        if owners is not None:
            self._hdr_words[_WORD_NAME:_WORD_NAME + count * _WORD_STRIDE:_WORD_STRIDE] = array(
                _SIZE_T_CODE, [owner.name_address for owner in owners])
        if controls is not None:
            store = self._controls
            lengths = [len(control) for control in controls]
            for offset, control, length in zip(self.control_offsets, controls, lengths):
                store[offset:offset + length] = control
            self._hdr_words[_WORD_CONTROLLEN:_WORD_CONTROLLEN + count * _WORD_STRIDE:
                            _WORD_STRIDE] = array(_SIZE_T_CODE, lengths)
        self._count = count
        return count

    def _bases(self, size: int) -> array[int]:
        """Where each datagram of a batch of ``size``-byte datagrams starts (made once per
        size, a bounded number of sizes kept)."""
        bases = self._uniform_bases.get(size)
        if bases is None:
            if len(self._uniform_bases) >= UNIFORM_LAYOUTS:
                self._uniform_bases.clear()
            start = self._arena_address
            bases = self._uniform_bases[size] = (
                array(_SIZE_T_CODE, range(start, start + self.size * size, size)) if size
                else array(_SIZE_T_CODE, [start]) * self.size)
        return bases

    def send(self, fd: int, start: int) -> int:
        """Send the filled datagrams from ``start`` on with one sendmmsg.

        Returns how many were sent (at least 1). A per-message failure at ``start`` raises.

        Raises:
            BlockingIOError: EAGAIN, nothing sent.
            OSError: the datagram at ``start`` failed with this errno.
        """
        remaining = self._count - start
        while True:
            sent: int = _sendmmsg(  # type: ignore[misc]
                fd, ctypes.byref(self._hdrs, start * _HDR_SIZE), remaining, 0)
            self.calls += 1
            if sent > 0:
                return sent
            err = _get_errno() if sent < 0 else errno.EAGAIN
            if err == errno.EINTR:
                continue
            _raise_errno(err)
            return 0  # pragma: no cover - unreachable

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._iov_words.release()
        self._hdr_words.release()
        del self._arena_anchor, self._controls_anchor
        self.arena.close()
        self._controls.close()


class SingleSend:
    """The one-datagram-per-syscall sender, same interface as ``SendBatch``."""

    def __init__(self, sock: socket.socket, address_of: Any, size: int = 1) -> None:
        self._sock = sock
        self.size = size
        self.capacity = sys.maxsize  # (no arena: each datagram is sent as it is)
        self.calls = 0
        self.busy = False
        self._datagrams: Sequence[bytes] = ()
        self._owners: Sequence[TxAccount] | None = None
        self._controls: Sequence[bytes] | None = None
        self._address_of = address_of
        self._count = 0

    def fill(self, datagrams: Sequence[bytes], owners: Sequence[TxAccount] | None,
             controls: Sequence[bytes] | None = None) -> int:
        self._count = min(len(datagrams), self.size)
        self._datagrams = datagrams
        self._owners = owners
        self._controls = controls
        return self._count

    def send(self, fd: int, start: int) -> int:
        self.calls += 1
        data = self._datagrams[start]
        control = self._controls[start] if self._controls is not None else b""
        while True:
            try:
                if self._owners is None:
                    self._sock.send(data)
                elif control:
                    self._sock.sendmsg([data], ancillaries_of(control), 0,
                                       self._address_of(self._owners[start].sockaddr))
                else:
                    self._sock.sendto(data, self._address_of(self._owners[start].sockaddr))
            except InterruptedError:
                continue
            return 1

    def close(self) -> None:
        self._datagrams = ()
        self._owners = None


Receiver = RecvBatch | SingleRecv
Sender = SendBatch | SingleSend


def make_receiver(sock: socket.socket, batch_size: int, slot_size: int, named: bool,
                  key_of: Any, *, state: SocketState | None = None) -> Receiver:
    """The batch receiver for ``sock``, or the single-datagram one (batch_size 1, no recvmmsg),
    laid out for what ``state`` says the kernel reports (GRO runs, packet info, TOS bytes)."""
    pktinfo = state is not None and state.pktinfo
    if batch_size > 1 and HAVE_MMSG:
        return RecvBatch(batch_size, slot_size, sock.family, named,
                         gro=state is not None and state.gro, pktinfo=pktinfo,
                         tos=state is not None and state.ecn)
    return SingleRecv(sock, slot_size, key_of, pktinfo=pktinfo)


def make_sender(sock: socket.socket, batch_size: int, slot_size: int, named: bool,
                address_of: Any, *, state: SocketState | None = None,
                arena_slots: int | None = None) -> Sender:
    """The batch sender for ``sock``, or the single-datagram one, with room per slot for the
    control messages ``state`` says datagrams may carry (source address, TOS byte), and for
    the payloads of ``arena_slots`` datagrams of ``slot_size`` (default: ``batch_size``)."""
    if batch_size > 1 and HAVE_MMSG and (BYTES_DATA_OFFSET is not None or not named):
        family = sock.family
        namelen = 16 if family == socket.AF_INET else _SOCKADDR_IN6_SIZE
        space = 0
        if state is not None and state.pktinfo:
            space += cmsg_space(12 if family == socket.AF_INET else 20)
        if state is not None and state.ecn:
            space += cmsg_space(4)
        return SendBatch(batch_size, slot_size, named, namelen, control_space=space,
                         arena_slots=arena_slots)
    return SingleSend(sock, address_of)
