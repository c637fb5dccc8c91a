"""Usage errors in the user's terms: the option's name and what it must be, one line, a hint, no traceback.

The commands run in this process (the ``cli`` fixture): checking options needs no child process.
"""

from __future__ import annotations

import shlex

import pytest

from migrate import cli as commands

# One case a line: a command line, " -> ", and what the first line of its stderr must say.
USAGE_ERRORS = """
migrate-src --guest-mib 0                 -> --guest-mib must be at least 1
migrate-src --guest-mib 0.5               -> --guest-mib must be at least 1
migrate-src --guest-mib -3                -> --guest-mib must be at least 1
migrate-src --guest-mib abc               -> argument --guest-mib: 'abc' is not a number
migrate-src --guest-mib nan               -> argument --guest-mib: 'nan' is not a finite number
migrate-src --guest-mib 1e12              -> is larger than this machine's memory
migrate-src --guest-pages 0               -> --guest-pages must be at least 1
migrate-src --guest-pages 1.5             -> argument --guest-pages: '1.5' is not a whole number
migrate-src --guest-pages 2 --vcpus 3     -> --vcpus 3 needs a guest of at least 3 pages, one per vCPU; this one has 2
migrate-src --vcpus 0                     -> --vcpus must be between 1 and 256, not 0
migrate-src --vcpus 257                   -> --vcpus must be between 1 and 256, not 257
migrate-src --seed -1                     -> --seed must be between 0 and 2^64-1
migrate-src --seed 18446744073709551616   -> --seed must be between 0 and 2^64-1
migrate-src --zero-fraction 1.5           -> --zero-fraction must be between 0 and 1, not 1.5
migrate-src --zero-fraction -0.1          -> --zero-fraction must be between 0 and 1, not -0.1
migrate-src --rate -1                     -> --rate cannot be negative
migrate-src --rate 18446744073709551616   -> --rate must be below 2^64
migrate-src --run-before -1               -> --run-before cannot be negative
migrate-src --handshake-timeout 0         -> --handshake-timeout must be more than 0
migrate-src --reconnect-timeout -5        -> --reconnect-timeout must be more than 0
migrate-src --reconnect-timeout 0         -> --reconnect-timeout must be more than 0
migrate-src --max-pending 0               -> --max-pending must be at least 1
migrate-src --link-timeout 0              -> --link-timeout must be more than 0
migrate-dst --connect-timeout -1          -> --connect-timeout must be more than 0
migrate-dst --prefetch 256                -> --prefetch must be between 0 and 255
migrate-dst --tls                         -> TLS needs --tls-cert, --tls-key, --tls-ca as well
migrate-src --guest-mib 1 --guest-pages 3 -> not allowed with argument --guest-mib
migrate-dst --run-after -1                -> --run-after cannot be negative
migrate-dst --prefetch -2                 -> --prefetch must be between 0 and 255
migrate-dst --prefetch x                  -> argument --prefetch: 'x' is not a whole number
migrate-dst --reconnect-timeout 0         -> --reconnect-timeout must be more than 0
migrate-dst --switchover-timeout 0        -> --switchover-timeout must be more than 0
migrate-dst --watchdog 0                  -> --watchdog must be more than 0
migrate-dst --watchdog inf                -> argument --watchdog: 'inf' is not a finite number
migrate-dst --bogus                       -> unrecognized arguments: --bogus
"""
CASES = [[field.strip() for field in line.split(" -> ")] for line in USAGE_ERRORS.strip().splitlines()]


@pytest.mark.parametrize("command,message", CASES, ids=[command for command, _ in CASES])
def test_nonsense_numbers_are_named_in_the_options_terms(cli, command: str, message: str) -> None:
    prog, *args = shlex.split(command)
    proc = cli(prog, *args)
    lines = proc.stderr.splitlines()
    assert proc.returncode in (1, 2), proc.stderr
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"{prog}: error: ") and message in lines[0], proc.stderr
    assert lines[1].startswith(f"{prog}: hint: ") and len(lines[1]) > len(f"{prog}: hint: ") + 5
    assert proc.stdout == ""


def test_no_progress_is_an_option_of_both_commands(cli) -> None:
    for prog in ("migrate-src", "migrate-dst"):
        assert "--no-progress" in cli(prog, "--help").stdout


# One case a line: a command's options, " -> ", the field of its config they set and the value
# (a Python expression), so that an option the command ignored would fail here.
OPTIONS = """
migrate-src --listen 127.0.0.2:9000         -> (host, port) == ("127.0.0.2", 9000)
migrate-src --guest-pages 64 --vcpus 3      -> (spec.pages, spec.vcpus) == (64, 3)
migrate-src --workload hotset --seed 5      -> (spec.workload.name, spec.seed) == ("hotset", 5)
migrate-src --zero-fraction 0.25 --rate 10  -> (spec.zero_permille, spec.rate) == (250, 10)
migrate-src --run-before 2.5                -> run_before == 2.5
migrate-src --handshake-timeout 7           -> handshake_timeout == 7
migrate-src --reconnect-timeout 9           -> reconnect_timeout == 9
migrate-src --link-timeout 4                -> link_timeout == 4
migrate-src --max-pending 5                 -> max_pending == 5
migrate-src --mode hybrid --precopy-rounds 3 --switchover-ms 12 -> (mode.name, precopy_rounds, switchover_ms) == ("hybrid", 3, 12)
migrate-src --stream-order working-set      -> stream_order.value == "working-set"
migrate-src --max-bandwidth 1Gbit           -> max_bandwidth == 125_000_000
migrate-src --prepage bubble                -> prepage == "bubble"
migrate-dst --connect 127.0.0.3:9100        -> (host, port) == ("127.0.0.3", 9100)
migrate-dst --run-after 0.5 --verify        -> (run_after, verify) == (0.5, True)
migrate-dst --prefetch 4                    -> prefetch == 4
migrate-dst --reconnect-timeout 5           -> reconnect_timeout == 5
migrate-dst --watchdog 3                    -> watchdog == 3
migrate-dst --link-timeout 6                -> link_timeout == 6
migrate-dst --connect-timeout 8             -> connect_timeout == 8
migrate-dst --switchover-timeout 90         -> switchover_timeout == 90
"""
OPTION_CASES = [[field.strip() for field in line.split(" -> ")] for line in OPTIONS.strip().splitlines()]


@pytest.mark.parametrize("command,check", OPTION_CASES, ids=[command for command, _ in OPTION_CASES])
def test_every_option_reaches_the_config_the_command_runs_with(command: str, check: str) -> None:
    prog, *args = shlex.split(command)
    if prog == "migrate-src":
        cfg = commands.source_config(commands.src_parser().parse_args(args))
    else:
        cfg = commands.destination_config(commands.dst_parser().parse_args(args))
    assert eval(check, {}, vars(cfg)), vars(cfg)
