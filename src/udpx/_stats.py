"""Snapshots of a connection's and a listener's counters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

__all__ = ["ConnStats", "ListenerStats", "drops_mapping", "ecn_mapping"]


def drops_mapping(**counts: int) -> Mapping[str, int]:
    return MappingProxyType(dict(counts))


def ecn_mapping(counts: Sequence[int]) -> Mapping[str, int]:
    """Datagrams per ECN codepoint (indexed by codepoint) as QUIC's ACK_ECN counts them."""
    return MappingProxyType({"ect0": counts[2], "ect1": counts[1], "ce": counts[3]})


def _as_dict(stats: ConnStats | ListenerStats) -> dict[str, Any]:
    result: dict[str, Any] = {item.name: getattr(stats, item.name) for item in fields(stats)}
    result["drops"] = dict(stats.drops)
    result["ecn"] = dict(stats.ecn)
    return result


@dataclass(frozen=True, slots=True)
class ConnStats:
    """A connection's counters at one moment.

    ``rx_*`` count datagrams delivered to the connection (queued for ``recv``), ``tx_*`` those
    handed to the kernel. ``drops`` maps each reason to a count: ``rx_queue_full``,
    ``truncated``, ``send_error``, ``closed`` (protocol mode: held or arriving when it closed;
    it delivers nothing after close) and ``kernel`` on a dialed connection's own socket.
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Mapping[str, int] = field(default_factory=drops_mapping)
    #: ICMP errors the network reported about this peer (port unreachable...).
    icmp_errors: int = 0
    #: Datagrams received per ECN codepoint (``ecn`` on): ``ect0``, ``ect1``, ``ce``. Counted
    #: as they arrive, before the rx queue: one this connection then dropped (``drops``)
    #: counts too, as the network marked it.
    ecn: Mapping[str, int] = field(default_factory=lambda: ecn_mapping([0, 0, 0, 0]))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return _as_dict(self)


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """A listener's counters at one moment: totals over all its connections, past and present.

    ``drops`` adds ``backlog_full``, ``conn_limit``, ``unaccepted`` (queued on connections
    closed before ``accept()`` returned them), ``memory_limit``, ``bad_source``, ``refused``
    (protocol mode: the protocol refused a new peer) and ``kernel`` (the kernel's own drop
    count for the socket, which counts a dropped GRO run as one) to the connection reasons.
    ``conns`` is the number open now, ``accepted`` the number ``accept()`` returned since the
    start (in protocol mode: connections handed to protocols that kept them, i.e. whose
    ``connection_made`` neither raised nor closed the connection).
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Mapping[str, int] = field(default_factory=drops_mapping)
    conns: int = 0
    accepted: int = 0
    #: ICMP errors read from the socket's error queue (about any peer, open or gone).
    icmp_errors: int = 0
    #: Datagrams received per ECN codepoint (``ecn`` on), on arrival: every connection's,
    #: and those of peers refused a connection.
    ecn: Mapping[str, int] = field(default_factory=lambda: ecn_mapping([0, 0, 0, 0]))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return _as_dict(self)
