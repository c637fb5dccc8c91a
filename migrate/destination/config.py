"""What migrate-dst is asked to do: its options, as one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import Memory
from ..wire import TlsConfig


@dataclass
class DestinationConfig:
    host: str
    port: int
    run_after: float = 1.0
    verify: bool = False
    key: bytes = b""
    prefetch: int = 0  # neighbours requested after each faulting page
    reconnect_timeout: float = 30.0  # how long a lost source may take to come back
    watchdog: float = 2.0  # seconds a vCPU may wait for one page before it is reported
    link_timeout: float = 10.0  # silence while pages are owed before a link counts as lost
    connect_timeout: float = 10.0  # how long connecting may keep being refused or dropped
    tls: TlsConfig | None = None  # mutual TLS 1.3 on every connection
    switchover_timeout: float = 300.0  # how long the source may run its guest before migrating it
    memory: Memory | None = None  # the guest's memory here (None: the source's kind)
    handoff: str | None = None  # serve the memory of the VMM that connects to this Unix socket (migrate.handoff)
    handoff_timeout: float = 60.0  # how long to wait for that VMM and its message

    @property
    def idle_ms(self) -> int:
        """``link_timeout`` in the native loops' unit: how long a loop may wait for the peer."""
        return max(1, round(self.link_timeout * 1000))
