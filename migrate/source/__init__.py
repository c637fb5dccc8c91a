"""migrate-src: owns the running guest, hands it over at switchover, then serves its pages.

Three modes (``--mode``, ``modes.py``): *postcopy* stops the vCPUs and sends
their state at once; *hybrid* first copies memory in precopy rounds while the
guest runs here, and at the switchover has the destination discard what was
written since the last round, which postcopy then brings; *precopy* sends
those last pages with the vCPUs stopped, so the destination starts with every
page present.

The parts, in reading order, each one job:

- ``migration.py``: ``Source.run`` and ``Migration.run``, the phases, and the
  recovery after a lost link; ``statistics()``;
- ``admission.py``: listening, accepting, first bytes, TLS, the handshake,
  the session (``wait_paired``);
- ``modes.py``: the three modes as objects (the only reader of ``--mode``
  and ``--stream-order``), and their switchover plans;
- ``planner.py``: the rounds' planner and the switchover plan's types, pure
  (no kernel, no socket, no trio);
- ``rounds.py``: the rounds' driver; ``scans.py``: the kernel's scans of what
  the guest wrote; ``switchover.py``: the switchover's driver;
- ``streamer.py``: the postcopy stream (windows, notes, pre-paging);
  ``server.py``: the request server; ``sender.py``: the native sender and its pacer;
- ``config.py``: the options.
"""

from .config import SourceConfig, StreamOrder
from .migration import Source, serve
from .planner import NOT_CONVERGING
from .scans import WORKING_SET_S

__all__ = ["NOT_CONVERGING", "WORKING_SET_S", "Source", "SourceConfig", "StreamOrder", "serve"]
