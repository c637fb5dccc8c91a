"""cffi build script (API mode): compiles native/*.c into ``migrate._native``.

The headers are both the cdef and the compiler's declarations, so kernel
values and struct layouts come from the compiler, never typed in by hand.
"""
import os
import pathlib
import shutil
import sys
import sysconfig

from cffi import FFI

HERE = pathlib.Path(__file__).parent
# stats.h and wire.h before the headers that use their types; kernel.h and common.h are C
# only (see there).
HEADERS = ["stats.h", "uffd.h", "guest.h", "wire.h", "link.h", "dataplane.h", "dirty.h"]
SOURCES = ["stats.c", "uffd.c", "guest.c", "wire.c", "link.c", "dataplane.c", "dirty.c"]


def _check_toolchain() -> None:
    """Fail early with a hint rather than with a compiler's traceback."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        sys.exit(f"uffd-migrate: C compiler {cc!r} not found; hint: apt-get install gcc")
    if not pathlib.Path("/usr/include/linux/userfaultfd.h").exists():
        sys.exit("uffd-migrate: <linux/userfaultfd.h> not found; hint: apt-get install linux-libc-dev")
    if not pathlib.Path("/usr/include/openssl/ssl.h").exists():
        sys.exit("uffd-migrate: <openssl/ssl.h> not found (TLS); hint: apt-get install libssl-dev")


# A sanitizer build (scripts/sanitize): UFFD_MIGRATE_SANITIZE=address,undefined
# instruments the native code with ASan and UBSan, unoptimised enough for
# readable reports.  Loading it needs the ASan runtime first in the process
# (LD_PRELOAD), which scripts/sanitize arranges.  Warnings are errors there,
# so that CI fails on a new one while a user's install never does.  ThreadSanitizer
# needs an instrumented interpreter: the threads are checked by
# tests/native/tsan_plane.c instead.
SANITIZE = os.environ.get("UFFD_MIGRATE_SANITIZE", "")
SANITIZERS = {"address", "undefined"}


def _flags() -> tuple[list[str], list[str]]:
    """The compiler's and the linker's extra arguments."""
    warnings = ["-Wall", "-Wextra"]
    if not SANITIZE:
        return ["-O2", "-std=gnu11", *warnings], []
    unknown = set(SANITIZE.split(",")) - SANITIZERS
    if unknown:
        sys.exit(f"uffd-migrate: UFFD_MIGRATE_SANITIZE={SANITIZE!r}: {', '.join(sorted(unknown))} not supported; "
                 f"hint: a comma-separated subset of {', '.join(sorted(SANITIZERS))}")
    sanitize = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"]
    return ["-O1", "-g", "-std=gnu11", *warnings, "-Werror", *sanitize], sanitize


_check_toolchain()
COMPILE_ARGS, LINK_ARGS = _flags()
ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / h).read_text() for h in HEADERS))
ffibuilder.set_source(
    "migrate._native",
    "#include <stdint.h>\n" + "".join(f'#include "{h}"\n' for h in HEADERS),
    # setuptools wants source paths relative to the project root.
    sources=[f"native/{s}" for s in SOURCES],
    include_dirs=["native"],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
    libraries=["ssl", "crypto"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
