"""udpx: TCP-like connections over UDP for asyncio, batched with recvmmsg/sendmmsg."""

import logging as _logging

from ._batch_writer import BatchWriter as BatchWriter
from ._conn import UDPConn as UDPConn
from ._dial import dial as dial
from ._endpoint import EndpointTransport as EndpointTransport
from ._endpoint import create_datagram_endpoint as create_datagram_endpoint
from ._errors import ConnectionClosed as ConnectionClosed
from ._errors import ListenerClosed as ListenerClosed
from ._errors import MessageTooLong as MessageTooLong
from ._errors import QueueFull as QueueFull
from ._errors import UDPXError as UDPXError
from ._errors import WouldBlock as WouldBlock
from ._install import install as install
from ._install import is_patched as is_patched
from ._install import loop_factory as loop_factory
from ._install import patch_loop as patch_loop
from ._install import uninstall as uninstall
from ._listener import Listener as Listener
from ._listener import listen as listen
from ._opening import Opening as Opening
from ._options import Options as Options
from ._protocol import ConnProtocol as ConnProtocol
from ._run import run as run
from ._run import worker_id as worker_id
from ._stats import ConnStats as ConnStats
from ._stats import ListenerStats as ListenerStats

__version__ = "0.1.0"

# As libraries do: without logging configured by the application, udpx's warnings (drops, capped
# buffers) go nowhere rather than to stderr through logging's last-resort handler. Configure
# logging (e.g. logging.basicConfig()) to see them.
_logging.getLogger("udpx").addHandler(_logging.NullHandler())

__all__ = [
    "BatchWriter",
    "ConnProtocol",
    "ConnStats",
    "ConnectionClosed",
    "EndpointTransport",
    "ListenerClosed",
    "ListenerStats",
    "MessageTooLong",
    "Opening",
    "Options",
    "QueueFull",
    "UDPConn",
    "UDPXError",
    "WouldBlock",
    "create_datagram_endpoint",
    "dial",
    "install",
    "is_patched",
    "listen",
    "loop_factory",
    "patch_loop",
    "run",
    "uninstall",
    "worker_id",
]
