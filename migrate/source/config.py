"""What migrate-src is asked to do: its options, as one dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .. import protocol as p
from ..guest import GuestSpec
from ..wire import TlsConfig


class StreamOrder(enum.Enum):
    """What the postcopy stream sends first."""

    address = "address"
    working_set = "working-set"


@dataclass
class SourceConfig:
    host: str
    port: int
    spec: GuestSpec
    memory_file: str | None = None  # serve this image (migrate.image) instead of running a guest
    run_before: float = 1.0
    key: bytes = b""
    ready_file: str | None = None
    handshake_timeout: float = 10.0  # a silent or slow-drip client is dropped after this
    reconnect_timeout: float = 60.0  # how long a lost destination may take to come back
    link_timeout: float = 10.0  # a send the destination does not take for this long means a lost link
    max_pending: int = 16  # handshakes in progress at once; newcomers beyond are closed at once
    tls: TlsConfig | None = None  # mutual TLS 1.3 on every connection
    mode: p.Mode = p.Mode.postcopy
    precopy_rounds: int = 10  # at most this many rounds, the full first one included
    switchover_ms: float = 5.0  # rounds end once what is written would take this long to send
    stream_order: StreamOrder = StreamOrder.address
    max_bandwidth: int = 0  # bytes per second the background stream may use; 0: no cap
    prepage: str = "jump"  # the postcopy stream's pre-paging policy (migrate.prepage)

    @property
    def idle_ms(self) -> int:
        """``link_timeout`` in the native loops' unit: how long a send may wait for the peer."""
        return max(1, round(self.link_timeout * 1000))
