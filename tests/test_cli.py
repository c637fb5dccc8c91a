"""Usage errors in the user's terms: the option's name and what it must be, one line, a hint, no traceback.

The commands run in this process (the ``cli`` fixture): checking options needs no child process.
"""

from __future__ import annotations

import shlex

import pytest

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
