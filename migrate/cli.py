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
from typing import Callable

import trio

from .errors import MigrateError, UsageError, find
from .guest import GuestSpec, Workload
from .metrics import write_metrics
from .protocol import Mode
from .source import NOT_CONVERGING, WORKING_SET_S, SourceConfig, StreamOrder
from .uffd import PAGE_SIZE
from .wire import parse_address

DEFAULT_PORT = 7450
KEY_ENV = "MIGRATE_KEY"


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", metavar="PATH",
                        help=f"shared secret both sides prove with HMAC (or set ${KEY_ENV}); default: none")
    parser.add_argument("--link-timeout", type=_positive_float, default=10.0, metavar="S",
                        help="seconds a connection may stay silent while pages are owed (or refuse to take "
                             "them) before it counts as lost and recovery starts (default 10)")
    parser.add_argument("--metrics", metavar="PATH|-", help="write one JSON object of metrics here (- for stdout)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="format of stderr log lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def _src_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="migrate-src",
        description="Run a demo guest and hand it over to migrate-dst by live migration (postcopy, hybrid or "
                    "precopy).",
        epilog="The guest runs until a destination connects and --run-before seconds have passed; then, in "
               "postcopy, its vCPUs stop, their state goes to the destination, and its memory follows. In "
               "hybrid and precopy, precopy rounds start then, while the guest keeps running here.")
    ap.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                    help=f"address to listen on; port 0 picks a free one (default 127.0.0.1:{DEFAULT_PORT})")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--guest-mib", type=_positive_float, default=256, metavar="N",
                      help="guest memory size in MiB (default 256)")
    size.add_argument("--guest-pages", type=_positive_int, metavar="N", help="guest memory size in 4 KiB pages")
    ap.add_argument("--vcpus", type=_positive_int, default=2, metavar="N", help="vCPU threads (default 2)")
    ap.add_argument("--workload", choices=[w.name for w in Workload], default="hotset",
                    help="access pattern of every vCPU (default hotset: 90%% of accesses to 10%% of memory)")
    ap.add_argument("--seed", type=int, default=1, metavar="N", help="workload seed (default 1)")
    ap.add_argument("--zero-fraction", type=_positive_float, default=0.25, metavar="F",
                    help="fraction of guest memory left all-zero (default 0.25)")
    ap.add_argument("--rate", type=int, default=0, metavar="N",
                    help="accesses per second per vCPU; 0 runs flat out (default 0)")
    ap.add_argument("--run-before", type=_positive_float, default=1.0, metavar="S",
                    help="seconds the guest runs here before switchover, at the least (default 1)")
    ap.add_argument("--mode", choices=[m.name for m in Mode], default="postcopy",
                    help="postcopy: stop here, resume there at once, memory follows on demand; hybrid: precopy "
                         "rounds while the guest runs here, then postcopy for the pages written since the last "
                         "round; precopy: the same rounds, then those pages with the guest stopped, and the "
                         "destination resumes it only once all memory is there (default postcopy)")
    ap.add_argument("--precopy-rounds", type=_positive_int, metavar="N",
                    help="hybrid and precopy: at most N rounds, the first (every page) included; fewer when they "
                         "converge (see --switchover-ms) or stop converging (the pages written during a round "
                         f"reach {NOT_CONVERGING * 100:.0f}%% of those it sent) (default {SourceConfig.precopy_rounds})")
    ap.add_argument("--switchover-ms", type=_positive_float, metavar="MS",
                    help="hybrid and precopy: the switchover threshold, an estimate of time, not a page count: "
                         "once the pages written during a round would take at most MS ms to send at the rate "
                         "the rounds achieved, they are the last round and the guest switches over after it. "
                         "A time because it is what the switchover costs (precopy's downtime is the "
                         "stop-and-copy of what the last round left dirty; hybrid's postcopy tail is as long), "
                         "and a page count means a different wait on every link and for every share of zero "
                         f"pages (QEMU's downtime-limit works the same way). Default {SourceConfig.switchover_ms:g}")
    ap.add_argument("--stream-order", choices=[o.value for o in StreamOrder], default="address",
                    help="what the postcopy stream sends first: address (page 0 upwards, jumping after each "
                         "faulting page) or working-set (first the pages the guest wrote in each of its last two "
                         f"{WORKING_SET_S * 1e3:.0f} ms stretches before switchover, as the kernel tracked them; "
                         "in hybrid the pages left after the rounds are those already; precopy has no postcopy "
                         "phase) (default address)")
    ap.add_argument("--ready-file", metavar="PATH", help="file written once listening (for health checks)")
    ap.add_argument("--handshake-timeout", type=_positive_float, default=10.0, metavar="S",
                    help="seconds a connecting peer has to authenticate (default 10)")
    ap.add_argument("--reconnect-timeout", type=_positive_float, default=60.0, metavar="S",
                    help="seconds to wait for a destination that lost its link to come back (default 60)")
    _common(ap)
    return ap


def _dst_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="migrate-dst",
        description="Receive a running guest from migrate-src: it resumes here at once, its memory follows.")
    ap.add_argument("--connect", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                    help=f"migrate-src address (default 127.0.0.1:{DEFAULT_PORT})")
    ap.add_argument("--run-after", type=_positive_float, default=1.0, metavar="S",
                    help="seconds the guest runs here once all memory arrived (default 1)")
    ap.add_argument("--verify", action="store_true",
                    help="prove the migrated memory and CPU state equal a local replay of the same steps")
    ap.add_argument("--prefetch", type=int, default=0, metavar="N",
                    help="also request the N pages after each faulting page (default 0)")
    ap.add_argument("--reconnect-timeout", type=_positive_float, default=30.0, metavar="S",
                    help="after a lost link, seconds to keep reconnecting before giving up (default 30); "
                         "the guest waits meanwhile")
    ap.add_argument("--watchdog", type=_positive_float, default=2.0, metavar="S",
                    help="report a vCPU that waits longer than S seconds for one page (default 2)")
    _common(ap)
    return ap


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"t": round(record.created, 6), "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()})


def _setup_logging(prog: str, args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if args.log_format == "json" else logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)


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
    """trio.run, with a MigrateError raised inside a nursery unwrapped from its exception group."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        wanted = find(group, (MigrateError, KeyboardInterrupt))
        if wanted is None:
            raise
        raise wanted from None


def _print_error(prog: str, exc: MigrateError) -> None:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"{prog}: hint: {exc.hint}", file=sys.stderr)


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
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _run_src(args: argparse.Namespace) -> int:
    from .source import serve

    mode = Mode[args.mode]
    if mode is Mode.postcopy and (args.precopy_rounds is not None or args.switchover_ms is not None):
        raise UsageError("--precopy-rounds and --switchover-ms apply to precopy rounds",
                         hint="add --mode hybrid or --mode precopy")
    host, port = parse_address(args.listen, DEFAULT_PORT)
    if args.zero_fraction > 1:
        raise UsageError("--zero-fraction must be between 0 and 1")
    pages = args.guest_pages or max(1, math.ceil(args.guest_mib * 2**20 / PAGE_SIZE))
    key = _read_key(args)
    if not key and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise UsageError(f"refusing to listen on {host} without a key: anyone who reaches the port gets the guest",
                         hint=f"give --key-file PATH (or ${KEY_ENV}) on both sides, or listen on 127.0.0.1")
    spec = GuestSpec(pages=pages, vcpus=args.vcpus, workload=Workload[args.workload], seed=args.seed,
                     zero_permille=round(args.zero_fraction * 1000), rate=args.rate)
    cfg = SourceConfig(host=host, port=port, spec=spec, run_before=args.run_before, key=key,
                       ready_file=args.ready_file, handshake_timeout=args.handshake_timeout,
                       reconnect_timeout=args.reconnect_timeout, link_timeout=args.link_timeout, mode=mode,
                       stream_order=StreamOrder(args.stream_order))
    if args.precopy_rounds is not None:
        cfg.precopy_rounds = args.precopy_rounds
    if args.switchover_ms is not None:
        cfg.switchover_ms = args.switchover_ms
    metrics = _run_trio(serve, cfg)
    write_metrics(metrics, args.metrics, sys.stdout)
    return 0


def _run_dst(args: argparse.Namespace) -> int:
    from . import protocol as p
    from .destination import DestinationConfig, Destination
    from .summary import print_summary

    host, port = parse_address(args.connect, DEFAULT_PORT)
    if not 0 <= args.prefetch < p.MAX_RUN_PAGES:
        raise UsageError(f"--prefetch must be between 0 and {p.MAX_RUN_PAGES - 1}")
    cfg = DestinationConfig(host=host, port=port, run_after=args.run_after, verify=args.verify,
                            key=_read_key(args), prefetch=args.prefetch,
                            reconnect_timeout=args.reconnect_timeout, watchdog=args.watchdog,
                            link_timeout=args.link_timeout)
    metrics = _run_trio(Destination(cfg).run)
    write_metrics(metrics, args.metrics, sys.stdout)
    print_summary(metrics, sys.stderr)
    return 0 if metrics["verified"] is not False else 3


def src_main(argv: list[str] | None = None) -> int:
    return _main("migrate-src", _src_parser(), _run_src, argv)


def dst_main(argv: list[str] | None = None) -> int:
    return _main("migrate-dst", _dst_parser(), _run_dst, argv)
