"""Exceptions: one base class, so commands can turn any of them into one line."""

from __future__ import annotations

import errno as _errno
import os


class MigrateError(Exception):
    """Base of every error uffd-migrate reports to a user.

    Args:
        message: what went wrong, in one line.
        hint: how to fix it, or ``None``.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(MigrateError):
    """The user asked for something impossible (bad option, port in use...)."""


class LocalProtocolError(MigrateError):
    """We tried to misuse the protocol: a bug on our side."""


class RemoteProtocolError(MigrateError):
    """The peer broke the protocol: close that connection, keep serving."""


class ProtocolViolation(RemoteProtocolError):
    """The peer sent well-formed messages in an order, or with values, that the protocol forbids.

    A different version or a bug, never a broken link: unlike other remote
    errors it is not recovered from, as reconnecting would only meet it again.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="run the same uffd-migrate version on both sides")


class PeerError(MigrateError):
    """The peer reported an error of its own, or went away."""


class PeerGone(PeerError):
    """The connection was refused, reset or closed without a word from the peer.

    Unlike an ``Error`` the peer sent, nothing was decided: a listener that
    is busy (too many pending handshakes) closes a newcomer this way, so a
    connecting side may try again.
    """


class UffdError(MigrateError, OSError):
    """A userfaultfd operation failed; keeps ``errno`` and the operation's name."""

    def __init__(self, operation: str, err: int, hint: str | None = None) -> None:
        MigrateError.__init__(self, f"{operation} failed: {os.strerror(err)} ({_errno.errorcode.get(err, err)})", hint)
        self.errno = err
        self.operation = operation


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1b``, ``\\u202e``).

    A peer's words reach our terminal through logs and error lines; escaped,
    they can neither move the cursor, recolour the screen nor reorder the line.
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def find(exc: BaseException, types: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of ``types`` in ``exc``, looking inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        match, _ = exc.split(types)
        while isinstance(match, BaseExceptionGroup):
            match = match.exceptions[0]
        return match
    return exc if isinstance(exc, types) else None


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` (nested exception groups flattened), in order; ``[exc]`` for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


# What a broken link looks like: the peer vanished, timed out, or sent garbage (a cut in the middle
# of a frame).  A ProtocolViolation is none of these: see is_link_error.
LINK_ERRORS = (PeerError, RemoteProtocolError)


def is_link_error(exc: BaseException) -> bool:
    return isinstance(exc, LINK_ERRORS) and not isinstance(exc, ProtocolViolation)


def lost_link(exc: BaseException) -> BaseException | None:
    """The first link error when ``exc`` holds link errors and nothing else (a lost link: recover);
    None otherwise (re-raise: a bug, a local failure or a protocol violation is never mistaken for a
    lost link)."""
    if isinstance(exc, BaseExceptionGroup):
        lost, other = exc.split(is_link_error)
        if lost is None or other is not None:
            return None
        return find(lost, LINK_ERRORS)
    return exc if is_link_error(exc) else None
