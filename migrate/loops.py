"""Runs a native data-plane loop (native/dataplane.c) in a worker thread that a trio task owns.

The loop owns its socket direction(s) and its counters until it returns; it
never calls into Python.  The trio task that awaits ``run_native`` is its
supervisor: it starts the thread, stops it through an eventfd of its own when
cancelled, waits for it, and turns its result into a return value or one of
our exceptions.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

import trio

from ._native import ffi, lib
from .errors import MigrateError, PeerError, ProtocolViolation, RemoteProtocolError, UffdError

# What a loop's *why starts with when an operation on the guest's memory failed.
GUEST_MEMORY_OPERATIONS = ("UFFDIO", "reading the userfaultfd", "MADV_DONTNEED", "MADV_REMOVE")

STOPPED: int = lib.LOOP_STOPPED
CONTROL: int = lib.LOOP_CONTROL


def loop_error(rc: int, why: str, peer: str) -> MigrateError:
    """What a loop's ``LOOP_EOF`` or ``-errno`` means, as the exception a user reads."""
    if rc == lib.LOOP_EOF:
        return PeerError(f"{peer} closed the connection")
    err = -rc
    if err == errno.ENOMSG:  # well formed, out of order: reconnecting would meet it again
        return ProtocolViolation(f"{peer} sent a frame out of order: {why}")
    if err == errno.EBADMSG:
        return RemoteProtocolError(f"{peer} sent a bad frame: {why}")
    if why.startswith(GUEST_MEMORY_OPERATIONS):  # this side's own failure, never the link's
        return UffdError(why, err)
    if err == errno.ETIMEDOUT:
        if why == "the link stayed silent":
            return PeerError(f"{peer} went silent: no data while pages were owed")
        return PeerError(f"lost the connection to {peer}: {why}")
    return PeerError(f"lost the connection to {peer}: {why}: {os.strerror(err)}")


async def run_native(fn: Callable[..., int], *args: object, peer: str) -> int:
    """Runs ``fn(*args, stop_fd, why)`` in a worker thread to its end.

    Returns:
        ``CONTROL`` (a control frame waits in the connection's buffer: the
        caller reads it), or 0 (the loop's work is done).

    Raises:
        PeerError, RemoteProtocolError, UffdError: the loop's error, named.

    **Cancellation**: signals the loop's stop eventfd and waits for the thread
    to return, shielded: a cancelled caller never leaves a thread behind that
    could still place pages or use a socket.  The loop then reports that it
    was stopped, which is never mistaken for the peer going away.
    """
    stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    why = ffi.new("char **")
    done = False

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not done:
                os.eventfd_write(stop, 1)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_cancelled)
            # Not abandoned on cancel: the thread is waited for, then we close its eventfd.
            rc = await trio.to_thread.run_sync(fn, *args, stop, why)
            done = True
            nursery.cancel_scope.cancel()
    finally:
        os.close(stop)
    if rc == STOPPED:
        # Only our own eventfd stops a loop, and only when cancelled: then the
        # nursery above has raised Cancelled and this line is not reached.
        raise RuntimeError("a native loop reported a stop nobody asked for")
    if rc < 0 or rc == lib.LOOP_EOF:
        raise loop_error(rc, ffi.string(why[0]).decode() if why[0] else "", peer)
    return rc
