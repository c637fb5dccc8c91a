"""Connecting to the source and reconnecting after a lost link: one place, one back-off.

A session is three connections (bulk, requests, replies), each opened here
and authenticated (TLS when configured, the preamble, the source's Challenge,
our Hello, its Welcome).  A connection refused, reset or closed before the
Welcome is tried again with back-off until a deadline: a source that is still
starting, or busy with other handshakes (it closes newcomers beyond
``--max-pending`` at once), lets us in a moment later.  An answer (an Error
frame, a wrong proof) is final.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import trio

from .. import protocol as p
from ..errors import LINK_ERRORS, PeerError, PeerGone, ProtocolViolation, UsageError
from ..wire import FrameSocket, connect, format_address, mark_urgent
from .config import DestinationConfig

log = logging.getLogger(__package__)

# Pauses between connection attempts: quick at first (a source that is just
# starting), then no more than once a second (a source busy with a flood).
FIRST_RETRY = 0.05
MAX_RETRY = 1.0


class Backoff:
    """Attempts until ``deadline`` (trio's clock), pausing twice as long after each failure, up to MAX_RETRY."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.t0 = trio.current_time()
        self.attempts = 0
        self._delay = FIRST_RETRY

    def left(self) -> float:
        return self.deadline - trio.current_time()

    def elapsed(self) -> float:
        return trio.current_time() - self.t0

    @property
    def exhausted(self) -> bool:
        """No further attempt fits before the deadline."""
        return self.left() < FIRST_RETRY

    async def pause(self) -> None:
        """Sleeps before the next attempt.  Halving what is left near the deadline makes the last attempt
        start just before it, not a back-off step earlier."""
        await trio.sleep(min(self._delay, max(0.0, self.left() / 2)))
        self._delay = min(2 * self._delay, MAX_RETRY)


@dataclass
class Links:
    """One session's three connections."""

    bulk: FrameSocket
    requests: FrameSocket
    replies: FrameSocket

    def close(self) -> None:
        for fs in (self.bulk, self.requests, self.replies):
            fs.close()


class Connector:
    """Opens the connections of one session: the first (which learns the session's id and the guest), the
    others that join it, and all three again after a lost link."""

    def __init__(self, cfg: DestinationConfig) -> None:
        self.cfg = cfg
        self.where = format_address(cfg.host, cfg.port)
        self.session = b""  # the session's id, from the first Welcome
        self.info: p.GuestInfo | None = None  # from the first bulk connection: later ones are told it
        self.attempts = 0  # every try of every channel: more than 3 when the source was busy

    async def open(self, channel: p.Channel, deadline: float) -> FrameSocket:
        """Connects and authenticates one connection of the session (a new session before the first).

        Raises:
            PeerError: no Welcome by the deadline, or the source said no.
            RemoteProtocolError: the source is not a uffd-migrate source, or lacks the key.
        """
        backoff = Backoff(deadline)
        while True:
            backoff.attempts += 1
            self.attempts += 1
            try:
                with trio.fail_at(deadline):
                    return await self._open_once(channel)
            except trio.TooSlowError:
                hint = "is it busy with other connections? see its log; raise --connect-timeout"
                raise PeerError(f"the source at {self.where} did not complete the handshake in "
                                f"{backoff.elapsed():.3g} s ({backoff.attempts} attempts)", hint=hint) from None
            except PeerGone as exc:
                if backoff.exhausted:
                    raise PeerGone(f"{exc} (gave up after {backoff.attempts} attempts in {backoff.elapsed():.3g} s)",
                                   hint=exc.hint or "is the source busy with other connections? see its log; "
                                                    "raise --connect-timeout") from None
                if backoff.attempts == 1:
                    log.info("%s; trying again for up to %.3g s", exc, backoff.left())
                await backoff.pause()

    async def _open_once(self, channel: p.Channel) -> FrameSocket:
        """One attempt of ``open``; closes its socket on any failure, cancellation included."""
        cfg = self.cfg
        fs = FrameSocket(await connect(cfg.host, cfg.port, cfg.link_timeout),
                         p.Connection(p.Role.DESTINATION, self.info), f"source {self.where}",
                         frame_timeout=cfg.link_timeout)
        try:
            if channel is not p.Channel.BULK:
                mark_urgent(fs.sock)
            if cfg.tls is not None:
                await fs.start_tls(cfg.tls, cfg.host)
            await fs.send_preamble()
            challenge = await fs.expect(p.Challenge)
            hello = p.hello(cfg.key, channel, self.session, challenge)
            await fs.send(hello)
            welcome = await fs.expect(p.Welcome)
            p.check_welcome(cfg.key, challenge, hello, welcome)
        except BaseException:
            fs.close()
            raise
        self.session = welcome.session
        return fs

    async def open_links(self, bulk: FrameSocket, deadline: float) -> Links:
        """The requests and replies connections that join ``bulk``'s session; closes ``bulk`` if they fail."""
        try:
            requests = await self.open(p.Channel.REQUESTS, deadline)
            try:
                return Links(bulk, requests, await self.open(p.Channel.REPLIES, deadline))
            except BaseException:
                requests.close()
                raise
        except BaseException:
            bulk.close()
            raise

    async def reconnect(self, deadline: float, how_far: Callable[[], str]) -> tuple[Links, float]:
        """All three connections of the session again, each round of attempts bounded by the link timeout,
        until ``deadline``; returns them and the seconds it took.

        Raises:
            PeerError: the source did not come back by ``deadline``; ``how_far()`` ends the message.
            ProtocolViolation: the source broke the protocol: reconnecting would meet it again.
        """
        backoff, reason = Backoff(deadline), "no attempt fitted"
        while not backoff.exhausted:
            try:
                attempt = min(deadline, trio.current_time() + self.cfg.link_timeout)
                return await self.open_links(await self.open(p.Channel.BULK, attempt), attempt), backoff.elapsed()
            except (UsageError, *LINK_ERRORS) as exc:
                if isinstance(exc, ProtocolViolation):
                    raise
                reason = str(exc)
                await backoff.pause()
        raise PeerError(f"the source has been unreachable for {self.cfg.reconnect_timeout:g} s ({reason}); {how_far()}",
                        hint="restart the migration; raise --reconnect-timeout to ride out longer outages")
