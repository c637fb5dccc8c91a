"""migrate-dst: resumes the guest at once and fills its memory behind it.

The kernel is the only bookkeeper.  Since ``userfaultfd_must_wait()``
re-checks the page tables after a faulting thread has queued itself, a fault
that races with a ``UFFDIO_COPY`` of the same page is never lost; so this side
keeps no per-page state at all.  One nursery per session runs three native
loops (``plane.py``): the placer, the fault reader and the reply placer;
migration is complete when the pages present add up to the guest's size.

In hybrid and precopy modes the placer first runs alone, before switchover,
while the guest still runs on the source: it places each round, replaces
(discards, then places) the runs a later round sends again, acknowledges
each round, and at a hybrid switchover discards the runs the source names,
before the vCPUs start.  Still no record of which page is where: the source
names the runs, and the kernel's page tables say what is present.  In
precopy the vCPUs start only once every page is present, and nothing faults.

A lost link is not the end: the guest waits in its faults while this side
reconnects (``connect.py``), asks the kernel which pages are still absent,
and sends the source that list (and whether the vCPUs already run here).

The parts, in reading order: ``migration.py`` (``Destination.run``, the
phases), ``plane.py`` (the native loops and ``statistics()``), ``connect.py``
(connecting and reconnecting, one back-off), ``config.py`` (the options).
"""

from .config import DestinationConfig
from .migration import Destination

__all__ = ["Destination", "DestinationConfig"]
