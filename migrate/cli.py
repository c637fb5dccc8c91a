"""The two commands, migrate-src and migrate-dst: argument parsing, logging, one-line errors.

stdout carries machine-readable output only (the source's listening address,
``--metrics -``); logs, progress and the summary go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Callable, NoReturn

import trio

from . import handoff, progress, snapshot, vmm
from .destination import Destination, DestinationConfig
from .errors import MigrateError, UsageError, find, leaves
from .guest import GuestSpec, Workload
from .image import image_guest
from .memory import Memory
from .metrics import write_metrics
from .prepage import POLICIES as PREPAGE_POLICIES
from .protocol import MAX_RUN_PAGES, Mode
from .source import NOT_CONVERGING, WORKING_SET_S, SourceConfig, StreamOrder, serve
from .summary import print_summary
from .uffd import PAGE_SIZE
from .wire import TlsConfig, is_loopback, parse_address

DEFAULT_PORT = 7450
KEY_ENV = "MIGRATE_KEY"


def _number(text: str) -> float:
    """argparse type: a finite number (ranges are checked after parsing, in the option's own words)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _whole(text: str) -> int:
    """argparse type: a whole number."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


_RATE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_rate(text: str) -> int:
    """A rate in bytes per second: ``500M`` (bytes/s), ``1G``, ``2.5Gbit`` (bits/s, divided by 8).

    Suffixes K, M, G are powers of 1000, as on a link's name plate; a trailing
    ``B`` or ``B/s`` is allowed; ``bit``, ``bit/s`` or ``bps`` means bits.

    Raises:
        ValueError: not a positive rate in one of these forms.
    """
    t = text.strip()
    per_bit = False
    for tail in ("bit/s", "bit", "bps", "b/s"):  # a small b is a bit, as in Gbit/s
        if t.endswith(tail):
            t, per_bit = t[: -len(tail)], True
            break
    else:
        for tail in ("B/s", "B"):
            if t.endswith(tail):
                t = t[: -len(tail)]
                break
    unit = t[-1:].upper() if t[-1:].upper() in ("K", "M", "G") else ""
    number = t[: len(t) - len(unit)]
    value = float(number) * _RATE_UNITS[unit]  # ValueError for nonsense
    if per_bit:
        value /= 8
    if not math.isfinite(value) or value < 1:
        raise ValueError(text)
    return round(value)


def _rate(text: str) -> int:
    """argparse type: a rate (see ``parse_rate``)."""
    try:
        return parse_rate(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: give bytes per second such as 500M or 1G, or bits such as 1Gbit") from None


def _add_seconds(parser: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    """Adds an option that takes a time in seconds, S: a finite number (its range is checked after parsing)."""
    parser.add_argument(flag, type=_number, default=default, metavar="S", help=help)


def _require(ok: bool, message: str, hint: str) -> None:
    if not ok:
        raise UsageError(message, hint=hint)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line plus a hint, like every other user mistake.

    ``@FILE`` reads more options from FILE, one per line (the docker-compose
    demo passes its TLS options this way).
    """

    def __init__(self, **kw: object) -> None:
        super().__init__(fromfile_prefix_chars="@", **kw)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: hint: {self.prog} --help lists the options\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", metavar="PATH",
                        help=f"shared secret both sides prove with HMAC (or set ${KEY_ENV}); default: none")
    tls = parser.add_argument_group(
        "TLS", "mutual TLS 1.3 on every connection: each side proves its certificate, signed by the CA the other "
               "trusts; the destination also checks that the source's certificate names the --connect host")
    tls.add_argument("--tls", action="store_true", help="require TLS (needs the three files below)")
    tls.add_argument("--tls-cert", metavar="PATH", help="this side's certificate chain (PEM)")
    tls.add_argument("--tls-key", metavar="PATH", help="this side's private key (PEM)")
    tls.add_argument("--tls-ca", metavar="PATH", help="CA certificate(s) the peer's certificate must chain to (PEM)")
    tls.add_argument("--tls-rekey-bytes", type=_whole, metavar="N",
                     help="force a TLS key update every N bytes sent on each connection (default: OpenSSL's "
                          "own limits); for testing re-keying")
    _add_seconds(parser, "--link-timeout", 10.0,
                 help="seconds a connection may stay silent while pages are owed (or refuse to take them) "
                      "before it counts as lost and recovery starts (default 10)")
    _output_options(parser, metrics=True)


def _output_options(parser: argparse.ArgumentParser, *, metrics: bool) -> None:
    """What every command prints and how: its log lines (and its metrics, when it has any)."""
    if metrics:
        parser.add_argument("--metrics", metavar="PATH|-",
                            help="write one JSON object of metrics here (- for stdout)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="format of stderr log lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress line on a terminal (e.g. when another side draws one on the same "
                             "terminal); log lines still appear")


def _guest_options(ap: argparse.ArgumentParser) -> None:
    """The options that build the demo guest: migrate-src's, and migrate-snapshot's for the same guest."""
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--guest-mib", type=_number, default=256, metavar="N",
                      help="guest memory size in MiB (default 256)")
    size.add_argument("--guest-pages", type=_whole, metavar="N", help="guest memory size in 4 KiB pages")
    ap.add_argument("--vcpus", type=_whole, default=2, metavar="N", help="vCPU threads (default 2)")
    ap.add_argument("--workload", choices=[w.name for w in Workload], default="hotset",
                    help="access pattern of every vCPU (default hotset: 90%% of accesses to 10%% of memory)")
    ap.add_argument("--seed", type=_whole, default=1, metavar="N", help="workload seed (default 1)")
    ap.add_argument("--zero-fraction", type=_number, default=0.25, metavar="F",
                    help="fraction of guest memory left all-zero (default 0.25)")
    ap.add_argument("--rate", type=_whole, default=0, metavar="N",
                    help="accesses per second per vCPU; 0 runs flat out (default 0)")
    ap.add_argument("--memory", choices=[m.name for m in Memory], default="anon",
                    help="the guest's memory: anon (private, 4 KiB pages), memfd (shared memory, as a VMM shares "
                         "it with device back-ends; 4 KiB pages) or hugetlb (2 MiB huge pages, reserved first in "
                         "/proc/sys/vm/nr_hugepages; they migrate whole); the destination maps the same "
                         "(default anon)")


def src_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="migrate-src",
        description="Run a demo guest and hand it over to migrate-dst by live migration (postcopy, hybrid or "
                    "precopy).",
        epilog="The guest runs until a destination connects and --run-before seconds have passed; then, in "
               "postcopy, its vCPUs stop, their state goes to the destination, and its memory follows. In "
               "hybrid and precopy, precopy rounds start then, while the guest keeps running here. "
               "@FILE reads more options from FILE, one per line.")
    ap.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                    help=f"address to listen on; port 0 picks a free one (default 127.0.0.1:{DEFAULT_PORT})")
    _guest_options(ap)
    ap.add_argument("--memory-file", metavar="PATH",
                    help="serve this memory image (a snapshot's raw guest memory, as Firecracker's memory file is; "
                         "its state.json, when beside it, says the guest) instead of running a guest: postcopy, "
                         "switching over as soon as a destination joins; --memory gives its page size")
    _add_seconds(ap, "--run-before", 1.0,
                 help="seconds the guest runs here before switchover, at the least (default 1)")
    ap.add_argument("--mode", choices=[m.name for m in Mode], default="postcopy",
                    help="postcopy: stop here, resume there at once, memory follows on demand; hybrid: precopy "
                         "rounds while the guest runs here, then postcopy for the pages written since the last "
                         "round; precopy: the same rounds, then those pages with the guest stopped, and the "
                         "destination resumes it only once all memory is there (default postcopy)")
    ap.add_argument("--precopy-rounds", type=_whole, metavar="N",
                    help="hybrid and precopy: at most N rounds, the first (every page) included; fewer when they "
                         "converge (see --switchover-ms) or stop converging (the pages written during a round "
                         f"reach {NOT_CONVERGING * 100:.0f}%% of those it sent) (default {SourceConfig.precopy_rounds})")
    ap.add_argument("--switchover-ms", type=_number, metavar="MS",
                    help="hybrid and precopy: the switchover threshold, an estimate of time, not a page count: "
                         "once the pages written during a round would take at most MS ms to send at the rate "
                         "the rounds achieved, they are the last round and the guest switches over after it. "
                         "A time because it is what the switchover costs (precopy's downtime is the "
                         "stop-and-copy of what the last round left dirty; hybrid's postcopy tail is as long), "
                         "and a page count means a different wait on every link and for every share of zero "
                         f"pages (QEMU's downtime-limit works the same way). Default {SourceConfig.switchover_ms:g}")
    ap.add_argument("--stream-order", choices=[o.value for o in StreamOrder], default="address",
                    help="what the postcopy stream sends first: address (the order --prepage picks) or "
                         "working-set (first the pages the guest wrote in each of its last two "
                         f"{WORKING_SET_S * 1e3:.0f} ms stretches before switchover, as the kernel tracked them; "
                         "in hybrid the pages left after the rounds are those already; precopy has no postcopy "
                         "phase) (default address)")
    ap.add_argument("--max-bandwidth", type=_rate, metavar="RATE",
                    help="cap the background stream (precopy rounds and the postcopy stream) at RATE bytes per "
                         "second (K, M, G are powers of 1000: 500M is 500 MB/s; 1Gbit is 125 MB/s), like QEMU's "
                         "max-bandwidth and max-postcopy-bandwidth; pages a faulting vCPU waits for, and "
                         "precopy's stop-and-copy, are never capped, and replies never queue behind the stream "
                         "(default: no cap)")
    ap.add_argument("--prepage", choices=PREPAGE_POLICIES, default="jump",
                    help="what the postcopy stream sends next, from the faults the destination reports: none "
                         "(address order), jump (on from just after the last requested pages, as QEMU does), "
                         "bubble (outward both ways from the last fault, Hines & Gopalan), adaptive (ahead of "
                         "every cluster of faults whose strides show a trend, Leap's majority stride, in chunks "
                         "that grow while it holds; address order otherwise) (default jump)")
    ap.add_argument("--ready-file", metavar="PATH", help="file written once listening (for health checks)")
    _add_seconds(ap, "--handshake-timeout", 10.0, help="seconds a connecting peer has to authenticate (default 10)")
    ap.add_argument("--max-pending", type=_whole, default=16, metavar="N",
                    help="handshakes in progress at once; a connection beyond is closed at once and the "
                         "destination retries (default 16; lowered to fit the descriptor limit)")
    _add_seconds(ap, "--reconnect-timeout", 60.0,
                 help="seconds to wait for a destination that lost its link to come back (default 60)")
    _common(ap)
    return ap


def dst_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="migrate-dst",
        description="Receive a running guest from migrate-src: it resumes here at once, its memory follows.",
        epilog="@FILE reads more options from FILE, one per line.")
    ap.add_argument("--connect", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                    help=f"migrate-src address (default 127.0.0.1:{DEFAULT_PORT})")
    ap.add_argument("--run-after", type=_number, metavar="S",
                    help="seconds the guest runs here once all memory arrived (default 1)")
    ap.add_argument("--verify", action="store_true",
                    help="prove the migrated memory and CPU state equal a local replay of the same steps")
    ap.add_argument("--prefetch", type=_whole, default=0, metavar="N",
                    help="also request the N pages after each faulting page (default 0; not on hugetlb, whose page "
                         "is already 2 MiB)")
    ap.add_argument("--memory", choices=[Memory.anon.name, Memory.memfd.name],
                    help="map a 4 KiB guest as this kind here, whatever the source's (default: the source's kind; "
                         "a hugetlb guest is hugetlb here too)")
    _add_seconds(ap, "--connect-timeout", 10.0,
                 help="seconds to keep retrying a connection the source refuses or drops (it is starting, or "
                      "busy with other handshakes) before giving up (default 10)")
    _add_seconds(ap, "--reconnect-timeout", 30.0,
                 help="after a lost link, seconds to keep reconnecting before giving up (default 30); the guest "
                      "waits meanwhile")
    _add_seconds(ap, "--switchover-timeout", 300.0,
                 help="give up if the source has not begun the migration (its first precopy round, or the "
                      "switchover) within S seconds of connecting (default 300); it must exceed the source's "
                      "--run-before")
    _add_seconds(ap, "--watchdog", 2.0, help="report a vCPU that waits longer than S seconds for one page (default 2)")
    vmm = ap.add_argument_group(
        "serving a VMM's memory", "Firecracker's userfaultfd handoff (snapshot restore with a Uffd memory backend): "
        "the VMM maps the guest, registers it with a userfaultfd and hands that over; migrate-dst fills the VMM's "
        "memory from migrate-src (usually --memory-file): faults on demand, the rest streamed, no per-page state. "
        "The VMM runs the vCPUs and proves its guest, so --verify, --run-after and --memory do not apply")
    vmm.add_argument("--handoff", metavar="PATH",
                     help="listen on the Unix socket PATH (mode 0600) for one VMM's handoff message and userfaultfd")
    _add_seconds(vmm, "--handoff-timeout", 60.0,
                 help="seconds to wait for the VMM to connect and send its message (default 60)")
    _common(ap)
    return ap


def snapshot_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="migrate-snapshot",
        description="Run a demo guest for a while, stop it and save a snapshot of it, as a VMM saves one: "
                    "DIR/memory (its raw memory image) and DIR/state.json (the guest and its vCPUs' state).",
        epilog="migrate-vmm --snapshot DIR restores it through a page-fault handler. "
               "@FILE reads more options from FILE, one per line.")
    ap.add_argument("directory", metavar="DIR", help="where the snapshot goes (made if missing; replaced if there)")
    _guest_options(ap)
    _add_seconds(ap, "--seconds", 1.0, help="seconds the guest runs before it is stopped and saved (default 1)")
    _output_options(ap, metrics=False)
    return ap


def _firecracker(text: str) -> str:
    """argparse type: a Firecracker version whose handoff message we can write."""
    try:
        handoff.encode([], text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def vmm_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="migrate-vmm",
        description="A VMM stand-in: restore a snapshot as Firecracker does with a Uffd memory backend (map the "
                    "guest's memory empty, register it with a new userfaultfd, hand that to the page-fault "
                    "handler at --handoff in Firecracker's one message), run its vCPUs from the snapshot's CPU "
                    "state, and prove the restore by replay.",
        epilog="Only DIR/state.json is read: the memory comes from the handler, as with Firecracker. Prints "
               "'verified: yes' and exits 0 when the guest's memory and vCPUs equal a replay of the same steps, "
               "1 otherwise. @FILE reads more options from FILE, one per line.")
    ap.add_argument("--snapshot", required=True, metavar="DIR", help="the snapshot that migrate-snapshot saved")
    ap.add_argument("--handoff", required=True, metavar="PATH",
                    help="the page-fault handler's Unix socket (e.g. migrate-dst --handoff PATH)")
    ap.add_argument("--firecracker", type=_firecracker, default="1.12", metavar="VERSION",
                    help="send the handoff message as this Firecracker version does: 1.1-1.6 (base_host_virt_addr, "
                         "size, offset), 1.7-1.11 (and page_size_kib, in bytes), 1.12 on (and page_size) "
                         "(default 1.12)")
    ap.add_argument("--regions", type=_whole, default=1, metavar="N",
                    help="describe the guest as N regions, adjacent, each with its own offset (default 1)")
    ap.add_argument("--remove", type=_whole, default=0, metavar="N",
                    help="drop N ranges of memory (MADV_DONTNEED, as a balloon does) while the handler fills it, "
                         "before the vCPUs resume: the handler is told (UFFD_EVENT_REMOVE), and they must read as "
                         "zeros, which the proof checks (default 0)")
    _add_seconds(ap, "--seconds", 1.0, help="seconds the vCPUs run before they stop and the restore is proven "
                                            "(default 1)")
    _add_seconds(ap, "--timeout", 10.0,
                 help="give up when a vCPU (or the proof) has waited S seconds for a page the handler does not "
                      "place (default 10)")
    _output_options(ap, metrics=True)
    return ap


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"t": round(record.created, 6), "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()})


def _setup_logging(prog: str, args: argparse.Namespace) -> None:
    # On a terminal every log line clears a progress line first (see progress.py).
    handler = progress.LogHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if args.log_format == "json" else logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    progress.configure(False if args.no_progress else None)


def _read_key(args: argparse.Namespace) -> bytes:
    if args.key_file:
        try:
            with open(args.key_file, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read key file {args.key_file}: {exc.strerror}") from None
        if not key:
            raise UsageError(f"key file {args.key_file} is empty", hint="put a random secret in it: "
                             "head -c 32 /dev/urandom | base64 > key")
        return key
    return os.environ.get(KEY_ENV, "").encode()


def _run_trio(fn: Callable[..., object], *args: object) -> object:
    """trio.run, with what a nursery raised unwrapped from its exception group: a KeyboardInterrupt,
    or our errors as one (the first, naming the others); anything else (a bug) as it is, whole."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        ours, other = group.split((MigrateError, KeyboardInterrupt))
        if ours is None or other is not None:
            raise
        if find(ours, KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        first, *more = leaves(ours)
        if more:  # one line still, naming every failure
            first.args = (f"{first} (also: {'; '.join(str(e) for e in more)})",)
        raise first from None


def _print_error(prog: str, exc: MigrateError) -> None:
    progress.finish_all()  # the error goes below the last figures, and nothing is drawn after it
    progress.write_line(f"{prog}: error: {exc}", sys.stderr)
    if exc.hint:
        progress.write_line(f"{prog}: hint: {exc.hint}", sys.stderr)


def _main(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
          argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    _setup_logging(prog, args)
    try:
        return run(args)
    except MigrateError as exc:
        _print_error(prog, exc)
        return 1
    except KeyboardInterrupt:
        progress.finish_all()
        progress.write_line(f"{prog}: interrupted", sys.stderr)
        return 130


def _guest_pages(args: argparse.Namespace) -> int:
    """The guest size in pages, from --guest-mib or --guest-pages, checked against this machine."""
    if args.guest_pages is None:
        _require(args.guest_mib >= 1, "--guest-mib must be at least 1",
                 "for a smaller guest give --guest-pages N (4 KiB pages)")
        pages = math.ceil(args.guest_mib * 2**20 / PAGE_SIZE)
    else:
        _require(args.guest_pages >= 1, "--guest-pages must be at least 1", "the smallest guest is one 4 KiB page")
        pages = args.guest_pages
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    _require(pages * PAGE_SIZE <= memory,
             f"a guest of {pages * PAGE_SIZE >> 20} MiB is larger than this machine's memory ({memory >> 20} MiB)",
             "give a smaller --guest-mib: the source writes most of its guest's memory")
    return pages


def _check_common(args: argparse.Namespace) -> None:
    """The options both commands have: a timeout of 0 would give up, or spin, at once."""
    _require(args.reconnect_timeout > 0, "--reconnect-timeout must be more than 0",
             "seconds to wait for the other side to come back after a lost link, e.g. 30")
    _require(args.link_timeout > 0, "--link-timeout must be more than 0",
             "seconds of silence, while pages are owed, before a link counts as lost, e.g. 10")
    _require(args.tls_rekey_bytes is None or args.tls_rekey_bytes >= 1, "--tls-rekey-bytes must be at least 1",
             "bytes sent between TLS key updates, e.g. 1048576")


def _guest_spec(args: argparse.Namespace) -> GuestSpec:
    """The guest the options of ``_guest_options`` describe, each checked in the option's words.

    Raises:
        UsageError: an option is out of range; the hint says what would do.
    """
    pages = _guest_pages(args)
    _require(1 <= args.vcpus <= 256, f"--vcpus must be between 1 and 256, not {args.vcpus}",
             "each vCPU is a thread with a slice of guest memory")
    _require(args.vcpus <= pages, f"--vcpus {args.vcpus} needs a guest of at least {args.vcpus} pages, "
             f"one per vCPU; this one has {pages}", "give fewer --vcpus or a larger --guest-pages")
    _require(0 <= args.seed < 2**64, "--seed must be between 0 and 2^64-1", "the same seed replays the same run")
    _require(0 <= args.zero_fraction <= 1, f"--zero-fraction must be between 0 and 1, not {args.zero_fraction:g}",
             "it is the fraction of guest memory left all-zero, e.g. 0.25")
    _require(args.rate >= 0, "--rate cannot be negative", "accesses per second per vCPU; 0 runs flat out")
    _require(args.rate < 2**64, "--rate must be below 2^64", "accesses per second per vCPU; 0 runs flat out")
    return GuestSpec(pages=pages, vcpus=args.vcpus, workload=Workload[args.workload], seed=args.seed,
                     zero_permille=round(args.zero_fraction * 1000), rate=args.rate, memory=Memory[args.memory])


def _check_src(args: argparse.Namespace) -> None:
    """Every numeric option of migrate-src beyond the guest's in range, said in the option's words."""
    _require(args.max_pending >= 1, "--max-pending must be at least 1",
             "handshakes in progress at once; a destination beyond them retries, e.g. 16")
    _require(args.run_before >= 0, "--run-before cannot be negative",
             "seconds the guest runs here first; 0 switches over as soon as a destination connects")
    _require(args.handshake_timeout > 0, "--handshake-timeout must be more than 0",
             "seconds a connecting peer has to authenticate, e.g. 10")
    _require(args.precopy_rounds is None or args.precopy_rounds >= 1, "--precopy-rounds must be at least 1",
             "the first round sends every page; e.g. 10")
    _require(args.switchover_ms is None or args.switchover_ms > 0, "--switchover-ms must be more than 0",
             "the time the last round may take to send, e.g. 5")
    _check_common(args)


def _tls(args: argparse.Namespace, server: bool) -> TlsConfig | None:
    """The TLS context the options ask for: all three files, or none of them and no --tls."""
    files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    missing = [name for name, path in files.items() if not path]
    if len(missing) == len(files) and not args.tls:
        if args.tls_rekey_bytes:
            raise UsageError("--tls-rekey-bytes needs TLS", hint="give --tls-cert, --tls-key and --tls-ca")
        return None
    if missing:
        raise UsageError(f"TLS needs {', '.join(missing)} as well",
                         hint="give --tls-cert, --tls-key and --tls-ca (PEM files; the CA signs both sides' "
                              "certificates)")
    return TlsConfig(server, args.tls_cert, args.tls_key, args.tls_ca, rekey_bytes=args.tls_rekey_bytes or 0)


def source_config(args: argparse.Namespace) -> SourceConfig:
    """What migrate-src runs with, from its parsed arguments, every option checked.

    Raises:
        UsageError: an option is out of range or does not fit the others; the hint says what would.
    """
    mode = Mode[args.mode]
    if mode is Mode.postcopy and (args.precopy_rounds is not None or args.switchover_ms is not None):
        raise UsageError("--precopy-rounds and --switchover-ms apply to precopy rounds",
                         hint="add --mode hybrid or --mode precopy")
    host, port = parse_address(args.listen, DEFAULT_PORT)
    spec = _guest_spec(args)
    _check_src(args)
    key = _read_key(args)
    tls = _tls(args, server=True)
    if not key and tls is None and not is_loopback(host):
        raise UsageError(f"refusing to listen on {host} without TLS or a key: anyone who reaches the port gets "
                         "the guest", hint=f"give --tls-cert/--tls-key/--tls-ca (or at least --key-file PATH or "
                                           f"${KEY_ENV}) on both sides, or listen on 127.0.0.1")
    if args.memory_file:
        _require(mode is Mode.postcopy, f"--mode {mode.name} has nothing to do with a memory image, which never "
                 "changes", "leave --mode out: an image is served in postcopy")
        spec, _ = image_guest(args.memory_file, Memory[args.memory])
    cfg = SourceConfig(host=host, port=port, spec=spec, memory_file=args.memory_file,
                       run_before=0.0 if args.memory_file else args.run_before, key=key,
                       ready_file=args.ready_file, handshake_timeout=args.handshake_timeout,
                       reconnect_timeout=args.reconnect_timeout, link_timeout=args.link_timeout,
                       max_pending=args.max_pending, tls=tls, mode=mode, stream_order=StreamOrder(args.stream_order),
                       max_bandwidth=args.max_bandwidth or 0, prepage=args.prepage)
    if args.precopy_rounds is not None:
        cfg.precopy_rounds = args.precopy_rounds
    if args.switchover_ms is not None:
        cfg.switchover_ms = args.switchover_ms
    return cfg


def destination_config(args: argparse.Namespace) -> DestinationConfig:
    """What migrate-dst runs with, from its parsed arguments, every option checked.

    Raises:
        UsageError: an option is out of range; the hint says what would do.
    """
    host, port = parse_address(args.connect, DEFAULT_PORT)
    if args.handoff:
        given = [flag for flag, value in (("--verify", args.verify), ("--run-after", args.run_after is not None),
                                          ("--memory", args.memory)) if value]
        _require(not given, f"{', '.join(given)} cannot go with --handoff: the VMM maps the guest, runs it and "
                 "proves it", f"leave {', '.join(given)} out (the VMM's own checks say whether its guest is right)")
        _require(args.handoff_timeout > 0, "--handoff-timeout must be more than 0",
                 "seconds to wait for the VMM to connect and send its message, e.g. 60")
    run_after = 0.0 if args.handoff else 1.0 if args.run_after is None else args.run_after
    _require(run_after >= 0, "--run-after cannot be negative",
             "seconds the guest runs here once all memory arrived; 0 stops it at once")
    _require(0 <= args.prefetch < MAX_RUN_PAGES, f"--prefetch must be between 0 and {MAX_RUN_PAGES - 1}",
             "pages requested after each faulting page; 0 turns prefetching off")
    _require(args.connect_timeout > 0, "--connect-timeout must be more than 0",
             "seconds to keep retrying a refused or dropped connection, e.g. 10")
    _require(args.switchover_timeout > 0, "--switchover-timeout must be more than 0",
             "seconds the source may run its guest before migrating it, e.g. 300")
    _check_common(args)
    _require(args.watchdog > 0, "--watchdog must be more than 0",
             "seconds a vCPU may wait for one page before it is reported, e.g. 2")
    cfg = DestinationConfig(host=host, port=port, run_after=run_after, verify=args.verify,
                            key=_read_key(args), prefetch=args.prefetch,
                            reconnect_timeout=args.reconnect_timeout, watchdog=args.watchdog,
                            link_timeout=args.link_timeout, connect_timeout=args.connect_timeout,
                            switchover_timeout=args.switchover_timeout, tls=_tls(args, server=False),
                            memory=Memory[args.memory] if args.memory else None, handoff=args.handoff,
                            handoff_timeout=args.handoff_timeout)
    return cfg


def _run_src(args: argparse.Namespace) -> int:
    stats = _run_trio(serve, source_config(args))
    write_metrics(stats.to_json(), args.metrics, sys.stdout)
    return 0


def _run_dst(args: argparse.Namespace) -> int:
    stats = _run_trio(Destination(destination_config(args)).run)
    write_metrics(stats.to_json(), args.metrics, sys.stdout)
    print_summary(stats, sys.stderr)
    return 0 if stats.verified is not False else 3


def src_main(argv: list[str] | None = None) -> int:
    return _main("migrate-src", src_parser(), _run_src, argv)


def dst_main(argv: list[str] | None = None) -> int:
    return _main("migrate-dst", dst_parser(), _run_dst, argv)


def _run_snapshot(args: argparse.Namespace) -> int:
    spec = _guest_spec(args)
    _require(args.seconds >= 0, "--seconds cannot be negative", "seconds the guest runs before it is saved, e.g. 1")
    snap = _run_trio(snapshot.take, args.directory, spec, args.seconds)
    print(f"migrate-snapshot: saved {snap.directory}: a {spec.size >> 20} MiB {spec.memory.name} guest, "
          f"{spec.vcpus} vCPUs, {spec.workload.name}, seed {spec.seed}, stopped at steps {snap.steps()}",
          file=sys.stderr)
    return 0


def _run_vmm(args: argparse.Namespace) -> int:
    _require(args.seconds >= 0, "--seconds cannot be negative", "seconds the vCPUs run before the proof, e.g. 1")
    _require(args.timeout > 0, "--timeout must be more than 0", "seconds to wait for a page, e.g. 10")
    cfg = vmm.VmmConfig(snapshot=args.snapshot, handoff=args.handoff, firecracker=args.firecracker,
                        regions=args.regions, seconds=args.seconds, timeout=args.timeout, remove=args.remove)
    stats = _run_trio(vmm.restore, cfg)
    write_metrics(stats.to_json(), args.metrics, sys.stdout)
    stall = stats.vcpu_stall_us
    first = "no step" if stats.first_step_ms is None else f"{stats.first_step_ms:.2f} ms"
    print(f"migrate-vmm: restored {stats.guest_mib:.0f} MiB ({stats.memory}, {stats.regions} region(s), Firecracker "
          f"{stats.firecracker} message): first vCPU step {first} after the handoff, {stats.steps_run} steps, "
          f"{stall.count} stalls ({stall.total_ms:.1f} ms, p99 {stall.p99:.0f} µs), "
          f"{stats.pages_present_after_run}/{stats.pages_total} pages present when the vCPUs stopped\n"
          f"verified: {'yes' if stats.verified else 'NO'}", file=sys.stderr)
    return 0 if stats.verified else 1


def snapshot_main(argv: list[str] | None = None) -> int:
    return _main("migrate-snapshot", snapshot_parser(), _run_snapshot, argv)


def vmm_main(argv: list[str] | None = None) -> int:
    return _main("migrate-vmm", vmm_parser(), _run_vmm, argv)
