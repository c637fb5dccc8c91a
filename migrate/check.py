"""``python -m migrate.check``: can this machine run a migration?  One line either way.

Used by scripts/test and scripts/demo before anything else, so that a machine
without userfaultfd fails at once with the reason and a hint.
"""

from __future__ import annotations

import sys

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
    print(f"userfaultfd: ok (kernel features {uffd.features:#x})", file=sys.stderr)
    uffd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
