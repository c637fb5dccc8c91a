"""``python -m migrate.check``: can this machine run a migration?  One line either way.

Used by scripts/test and scripts/demo before anything else, so that a machine
without userfaultfd fails at once with the reason and a hint.  It also says
whether the kernel tracks writes (``WP_ASYNC`` and ``PAGEMAP_SCAN``, Linux
>= 6.7), which hybrid and precopy modes and working-set order need; postcopy
needs only userfaultfd; and which memory kinds (``--memory``) it can register,
with the huge pages available now.
"""

from __future__ import annotations

import sys

from .dirty import DirtyTracker
from .errors import MigrateError
from .memory import Memory, huge_pages_available, require_missing
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
    print(f"memory kinds (--memory): {', '.join(_kinds(uffd.features))}", file=sys.stderr)
    return 0


def _kinds(features: int) -> list[str]:
    """Each kind this kernel can register, hugetlb with the pool's free pages now."""
    kinds = []
    for memory in Memory:
        try:
            require_missing(memory, features)
        except MigrateError:
            continue
        if memory is Memory.hugetlb:
            try:
                kinds.append(f"hugetlb ({huge_pages_available()[0]} free 2 MiB huge pages)")
            except MigrateError as exc:  # a default huge page other than 2 MiB
                kinds.append(f"hugetlb unusable: {exc}")
            continue
        kinds.append(memory.name)
    return kinds


if __name__ == "__main__":
    sys.exit(main())
