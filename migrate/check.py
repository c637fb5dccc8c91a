"""``python -m migrate.check``: can this machine run a migration?  One line either way.

Used by scripts/test and scripts/demo before anything else, so that a machine
without userfaultfd fails at once with the reason and a hint.  It also says
whether the kernel tracks writes (``WP_ASYNC`` and ``PAGEMAP_SCAN``, Linux
>= 6.7), which hybrid and precopy modes and working-set order need; postcopy
needs only userfaultfd.
"""

from __future__ import annotations

import sys

from .dirty import DirtyTracker
from .errors import MigrateError
from .uffd import Userfaultfd


def main() -> int:
    try:
        uffd = Userfaultfd()
    except MigrateError as exc:
        print(f"userfaultfd is not available: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    uffd.close()
    try:
        DirtyTracker.check()
        tracking = "yes"
    except MigrateError as exc:
        tracking = f"no ({exc}): postcopy only"
    print(f"userfaultfd: ok (kernel features {uffd.features:#x}); write tracking for hybrid and precopy: "
          f"{tracking}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
