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
# wire.h before the headers that use its structs; kernel.h is C only (see there).
HEADERS = ["uffd.h", "guest.h", "wire.h", "link.h", "dataplane.h", "dirty.h"]
SOURCES = ["uffd.c", "guest.c", "wire.c", "link.c", "dataplane.c", "dirty.c"]


def _check_toolchain() -> None:
    """Fail early with a hint rather than with a compiler's traceback."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        sys.exit(f"uffd-migrate: C compiler {cc!r} not found; hint: apt-get install gcc")
    if not pathlib.Path("/usr/include/linux/userfaultfd.h").exists():
        sys.exit("uffd-migrate: <linux/userfaultfd.h> not found; hint: apt-get install linux-libc-dev")
    if not pathlib.Path("/usr/include/openssl/ssl.h").exists():
        sys.exit("uffd-migrate: <openssl/ssl.h> not found (TLS); hint: apt-get install libssl-dev")


_check_toolchain()
ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / h).read_text() for h in HEADERS))
ffibuilder.set_source(
    "migrate._native",
    "#include <stdint.h>\n" + "".join(f'#include "{h}"\n' for h in HEADERS),
    # setuptools wants source paths relative to the project root.
    sources=[f"native/{s}" for s in SOURCES],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["ssl", "crypto"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
