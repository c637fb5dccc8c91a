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

from .errors import MigrateError, UsageError, find
from .guest import GuestSpec, Workload
from .metrics import write_metrics
from .uffd import PAGE_SIZE
from .wire import TlsConfig, is_loopback, parse_address

DEFAULT_PORT = 7450
KEY_ENV = "MIGRATE_KEY"


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number")
    return value


def _seconds(text: str) -> float:
    """A timeout: a finite number of seconds > 0 (0 would give up before starting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0 seconds")
    return value


def _seed(text: str) -> int:
    """A workload seed: what the vCPUs' 64-bit PRNG state accepts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r}: must be within 0..2**64-1")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with the project's ``hint:`` line after a usage error (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: hint: {self.prog} --help explains every option\n")


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
    tls.add_argument("--tls-rekey-bytes", type=_positive_int, metavar="N",
                     help="force a TLS key update every N bytes sent on each connection (default: OpenSSL's "
                          "own limits); for testing re-keying")
    parser.add_argument("--link-timeout", type=_seconds, default=10.0, metavar="S",
                        help="seconds a connection may stay silent while pages are owed (or refuse to take "
                             "them) before it counts as lost and recovery starts (default 10)")
    parser.add_argument("--metrics", metavar="PATH|-", help="write one JSON object of metrics here (- for stdout)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="format of stderr log lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def _src_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="migrate-src",
        description="Run a demo guest and hand it over to migrate-dst by postcopy live migration.",
        epilog="The guest runs until a destination connects and --run-before seconds have passed; then its "
               "vCPUs stop, their state goes to the destination, and its memory follows.")
    ap.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                    help=f"address to listen on; port 0 picks a free one (default 127.0.0.1:{DEFAULT_PORT})")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--guest-mib", type=_positive_float, default=256, metavar="N",
                      help="guest memory size in MiB (default 256)")
    size.add_argument("--guest-pages", type=_positive_int, metavar="N", help="guest memory size in 4 KiB pages")
    ap.add_argument("--vcpus", type=_positive_int, default=2, metavar="N", help="vCPU threads (default 2)")
    ap.add_argument("--workload", choices=[w.name for w in Workload], default="hotset",
                    help="access pattern of every vCPU (default hotset: 90%% of accesses to 10%% of memory)")
    ap.add_argument("--seed", type=_seed, default=1, metavar="N", help="workload seed, 0..2**64-1 (default 1)")
    ap.add_argument("--zero-fraction", type=_positive_float, default=0.25, metavar="F",
                    help="fraction of guest memory left all-zero (default 0.25)")
    ap.add_argument("--rate", type=int, default=0, metavar="N",
                    help="accesses per second per vCPU; 0 runs flat out (default 0)")
    ap.add_argument("--run-before", type=_positive_float, default=1.0, metavar="S",
                    help="seconds the guest runs here before switchover, at the least (default 1)")
    ap.add_argument("--ready-file", metavar="PATH", help="file written once listening (for health checks)")
    ap.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="S",
                    help="seconds a connecting peer has to authenticate (default 10)")
    ap.add_argument("--max-pending", type=_positive_int, default=16, metavar="N",
                    help="handshakes in progress at once; a connection beyond is closed at once and the "
                         "destination retries (default 16; lowered to fit the descriptor limit)")
    ap.add_argument("--reconnect-timeout", type=_seconds, default=60.0, metavar="S",
                    help="seconds to wait for a destination that lost its link to come back (default 60)")
    _common(ap)
    return ap


def _dst_parser() -> argparse.ArgumentParser:
    ap = _Parser(
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
    ap.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="S",
                    help="seconds to keep retrying a connection the source refuses or drops (it is starting, "
                         "or busy with other handshakes) before giving up (default 10)")
    ap.add_argument("--reconnect-timeout", type=_seconds, default=30.0, metavar="S",
                    help="after a lost link, seconds to keep reconnecting before giving up (default 30); "
                         "the guest waits meanwhile")
    ap.add_argument("--watchdog", type=_seconds, default=2.0, metavar="S",
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


def _run_src(args: argparse.Namespace) -> int:
    from .source import SourceConfig, serve

    host, port = parse_address(args.listen, DEFAULT_PORT)
    if args.zero_fraction > 1:
        raise UsageError("--zero-fraction must be between 0 and 1")
    pages = args.guest_pages or max(1, math.ceil(args.guest_mib * 2**20 / PAGE_SIZE))
    key = _read_key(args)
    tls = _tls(args, server=True)
    if not key and tls is None and not is_loopback(host):
        raise UsageError(f"refusing to listen on {host} without TLS or a key: anyone who reaches the port gets "
                         "the guest", hint=f"give --tls-cert/--tls-key/--tls-ca (or at least --key-file PATH or "
                                           f"${KEY_ENV}) on both sides, or listen on 127.0.0.1")
    spec = GuestSpec(pages=pages, vcpus=args.vcpus, workload=Workload[args.workload], seed=args.seed,
                     zero_permille=round(args.zero_fraction * 1000), rate=args.rate)
    cfg = SourceConfig(host=host, port=port, spec=spec, run_before=args.run_before, key=key,
                       ready_file=args.ready_file, handshake_timeout=args.handshake_timeout,
                       reconnect_timeout=args.reconnect_timeout, link_timeout=args.link_timeout,
                       max_pending=args.max_pending, tls=tls)
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
                            link_timeout=args.link_timeout, connect_timeout=args.connect_timeout,
                            tls=_tls(args, server=False))
    metrics = _run_trio(Destination(cfg).run)
    write_metrics(metrics, args.metrics, sys.stdout)
    print_summary(metrics, sys.stderr)
    return 0 if metrics["verified"] is not False else 3


def src_main(argv: list[str] | None = None) -> int:
    return _main("migrate-src", _src_parser(), _run_src, argv)


def dst_main(argv: list[str] | None = None) -> int:
    return _main("migrate-dst", _dst_parser(), _run_dst, argv)
