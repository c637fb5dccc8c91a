"""The attack suite (issue 19): hostile peers, generated from the protocol's order table, against real
migrate-src and migrate-dst processes, like h2spec for HTTP/2 or tlsfuzzer for TLS.

Every case is one hostile act at one point of one conversation:

- a *role*: ``src`` is a fake destination (``FakeDestination``) against a real ``migrate-src``;
  ``dst`` is a fake source (``FakeSource``) against a real ``migrate-dst``;
- a *state* of ``TABLE`` (``migrate/protocol/state.py``) on a *channel* (bulk, requests, replies),
  reached honestly: the fake peer is a small but complete implementation of its side (the fake
  source streams the guest's real pages and CPU state, serves requests and rejoins; the fake
  destination keeps the pages, acknowledges rounds, rejoins after a lost link and proves what it
  received against a replay of the guest), with a tap at each state that fires once, at the case's;
- an *attack*: reset (SO_LINGER 0), half-close, go silent, drip a byte a second, garbage, the
  largest frame the codec admits, a control message the state forbids, a data frame the state
  forbids, answers nobody asked for, a flood of ZEROS over present pages, a channel opened twice,
  a storm of reconnections, or vanishing (the peer's veth link set down in network namespaces of our
  own); and, before any handshake completes, the TLS layer's (a certificate from another CA,
  plaintext against TLS and the reverse, a ClientHello then silence);
- a *transport* (plaintext, mutual TLS with certificates from trustme) and a *mode* (postcopy,
  hybrid, precopy) where the state exists in more than one.

The cases are generated from ``TABLE``: who sends next in each state, which control messages may
come (so which are forbidden) and which data frames its mask allows.  When it is the honest side's
turn to speak, what a peer sends is read in the next state where the peer has a move (``reading``);
a connection the honest side never reads again gets no sending attack.  Combinations that are
impossible or meaningless are pruned in code, each with its reason (``prune``), and the table shows
them; a state with no attack surface says so in a row of its own.

After its attack the fake peer stays honest where it can: it keeps using its other connections,
answers the honest side's recovery (the fake source serves reconnections, the fake destination
rejoins when the source ends its connections) and continues after an attack that leaves the
connection usable (a forbidden message, unasked answers, a ZEROS flood).  What is checked on every
case, automatically (``judge``):

- the honest process either completes and verifies (``--verify`` at a real destination, or the fake
  destination's own proof of the stream against a replay), or ends with one line (``prog: error: ...``
  and an optional ``prog: hint: ...``) and a non-zero exit within a bound computed from its options
  (``bound``); never a traceback; never ``pages_placed`` short of the guest or ``verified`` false
  with exit 0;
- a protocol violation ends it promptly, with no attempt to recover (``PROMPT_S``, and no "lost"
  line after the attack); an attack a correct peer absorbs (unasked answers, ZEROS over present
  pages) does not stop the migration;
- it never spins: its CPU time (utime + stime of every thread, ``/proc/PID/task/*/stat``) over any
  ``SPIN_WINDOW_S`` after the attack stays under ``SPIN_SHARE`` of a core.  The guest runs at
  ``--rate RATE`` accesses per second per vCPU, so its vCPU threads sleep nearly all the time (they
  all carry the process's name, so they cannot be told apart by ``comm``);
- a stranger (a connection that never completes a handshake) changes nothing: the source survives
  it, a legitimate ``migrate-dst`` that arrives afterwards gets in and verifies, and a migration in
  progress while strangers attack verifies too.  Strangers share a source (``run_strangers``): a
  run of them one after another, then a legitimate destination whose stream is slowed down
  (``--max-bandwidth``) while all of them attack again at once; a group that fails is run again one
  case at a time to find the culprit.

``python tests/attack.py [--quick] [-k PATTERN] [--jobs N]`` (or ``scripts/attack``) prints the table
and a count of outcomes, and exits 1 if any case failed.  ``tests/test_attack.py`` runs the quick
subset under pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fnmatch
import json
import os
import re
import secrets
import select
import shutil
import socket as stdsocket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import trio

from helpers import BIN, Pki, cpu_seconds
from migrate import protocol as p
from migrate._native import ffi, lib
from migrate.errors import MigrateError, PeerError, PeerGone
from migrate.guest import Guest, GuestSpec, Workload, replay
from migrate.protocol import codec
from migrate.wire import FrameSocket, TlsConfig, tune

State, Channel, Mode = p.State, p.Channel, p.Mode
S, D = p.Role.SOURCE, p.Role.DESTINATION
BULK, REQUESTS, REPLIES = Channel.BULK, Channel.REQUESTS, Channel.REPLIES

# -- the guest and the options every honest process runs with ----------------------------------------
PAGES = 1024  # 4 MiB: a migration takes milliseconds, so a case costs its timeouts, not its copying
VCPUS = 2
RATE = 2000  # accesses per second per vCPU: the vCPUs nap between accesses (see the module's docstring)
SEED = 7
WORKLOAD = Workload.uniform
ZERO_PERMILLE = 250
HANDSHAKE_S = 2.0  # migrate-src --handshake-timeout
LINK_S = 2.0  # --link-timeout, both sides
RECONNECT_S = 3.0  # --reconnect-timeout, both sides
CONNECT_S = 3.0  # migrate-dst --connect-timeout
SWITCHOVER_S = 6.0  # migrate-dst --switchover-timeout: a live source silent before the switchover
SRC_OPTS = ["--handshake-timeout", f"{HANDSHAKE_S:g}", "--link-timeout", f"{LINK_S:g}",
            "--reconnect-timeout", f"{RECONNECT_S:g}", "--no-progress"]
DST_OPTS = ["--connect-timeout", f"{CONNECT_S:g}", "--switchover-timeout", f"{SWITCHOVER_S:g}",
            "--link-timeout", f"{LINK_S:g}",
            "--reconnect-timeout", f"{RECONNECT_S:g}", "--no-progress"]
MARGIN_S = 4.0  # slack on every bound: the machine has 2 cores, shared
PROMPT_S = 4.0  # a protocol violation ends the honest side within this of the attack: no timeout governs it
REACH_S = 25.0  # a case that has not reached its state by then failed to
SPIN_SHARE = 0.5  # of one core, over SPIN_WINDOW_S, while the honest side waits: a spin
SPIN_WINDOW_S = 2.0
DRIP_EVERY_S = 1.0
FIRST_REQUEST_S = 0.3  # the fake source lets the vCPUs fault before it streams, so that requests come
STRANGER_GUEST_MIB = 8  # the source strangers attack: its stream is slowed down to last their attacks
STRANGER_RATE = 50  # its guest's accesses per second per vCPU (the last --rate wins): few faults
# Network namespaces for "vanish": link-local addresses on a veth pair between two namespaces of ours.
HOST_A, HOST_B = "169.254.77.1", "169.254.77.2"  # the honest side's end, the fake peer's end
GARBAGE = bytes(range(256)) * 4  # its first word is kind 0x03020100: no such frame kind
LABELS_OF_MODE = {"GuestInfo(postcopy)": {Mode.postcopy}, "GuestInfo(rounds)": {Mode.hybrid, Mode.precopy},
                  "Resume(waiting, postcopy)": {Mode.postcopy}, "Resume(waiting, rounds)": {Mode.hybrid, Mode.precopy}}
KINDS = {"PAGES": lib.WIRE_PAGES, "ZEROS": lib.WIRE_ZEROS, "DISCARD": lib.WIRE_DISCARD, "REQUEST": lib.WIRE_REQUEST}
KIND_SENDER = {"PAGES": S, "ZEROS": S, "DISCARD": S, "REQUEST": D}
# The data frames a peer sends, those it sends somewhere in TABLE first: which one a forbidden-data case
# picks.  REPLACE is a PAGES frame with the replace flag, which goes with DISCARD.
DATA_PREFERENCE = {S: ["DISCARD", "REPLACE", "PAGES", "ZEROS", "REQUEST"], D: ["REQUEST", "PAGES", "ZEROS", "DISCARD"]}


# == what TABLE says ===================================================================================
def honest_role(role: str) -> p.Role:
    """The role of the real process a case attacks: ``src`` attacks migrate-src."""
    return S if role == "src" else D


def peer_role(role: str) -> p.Role:
    return D if role == "src" else S


def prog(role: str) -> str:
    return "migrate-src" if role == "src" else "migrate-dst"


def moves(state: State) -> dict[tuple[p.Role, str], State]:
    return p.TABLE[state][1]


def in_mode(label: str, mode: Mode) -> bool:
    return mode in LABELS_OF_MODE.get(label, set(Mode))


def data_kinds(state: State, sender: p.Role) -> list[str]:
    """The data frames ``sender`` may send in ``state`` (REPLACE where DISCARD may come)."""
    mask = p.TABLE[state][0]
    kinds = [k for k, v in KINDS.items() if mask >> v & 1 and KIND_SENDER[k] is sender]
    return kinds + ["REPLACE"] * ("DISCARD" in kinds)


def peer_moves(state: State, peer: p.Role, mode: Mode) -> list[str]:
    return [label for (who, label) in moves(state) if who is peer and in_mode(label, mode)]


def peer_active(state: State, peer: p.Role, mode: Mode) -> bool:
    return bool(peer_moves(state, peer, mode) or data_kinds(state, peer))


def reading(role: str, state: State, mode: Mode) -> State:
    """Where the honest side reads what the peer sends in ``state``: that state when the peer has a
    move there, else the first state the honest side's own moves lead to where the peer has one (or
    where nobody has any)."""
    honest, peer = honest_role(role), peer_role(role)
    frontier, seen = [state], {state}
    while frontier:
        s = frontier.pop(0)
        if peer_active(s, peer, mode) or not moves(s):
            return s
        for (who, label), nxt in moves(s).items():
            if who is honest and in_mode(label, mode) and nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return state


def _hello_channel(label: str) -> Channel:
    return Channel(label[len("Hello("):].split(",")[0])


def channels(state: State) -> list[Channel]:
    """The connections ``state`` occurs on: those whose Hello leads to it (every one before the Hello)."""
    if state in (State.START, State.CHALLENGED, State.ENDED):
        return list(Channel)
    found = []
    for (_, label), first in moves(State.CHALLENGED).items():
        frontier, seen = [first], {first}
        while frontier:
            s = frontier.pop()
            for (_, lab), nxt in moves(s).items():
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        if state in seen and _hello_channel(label) not in found:
            found.append(_hello_channel(label))
    return sorted(found, key=list(Channel).index)


def _mode_known() -> dict[Mode, set[State]]:
    """Per mode, the states reached only once the mode is known on the connection: after a label that
    depends on it (GuestInfo, Resume(waiting, ...)), or where the destination says a label that does (a
    rejoined bulk connection's Resume: it learnt the mode in an earlier GuestInfo)."""
    known: dict[Mode, set[State]] = {}
    for mode in Mode:
        frontier, seen = [(State.START, False)], {(State.START, False)}
        while frontier:
            s, k = frontier.pop()
            for (_, label), nxt in moves(s).items():
                if not in_mode(label, mode):
                    continue
                says = any(who is D and lab in LABELS_OF_MODE for (who, lab) in moves(nxt))
                item = (nxt, k or label in LABELS_OF_MODE or says)
                if item not in seen:
                    seen.add(item)
                    frontier.append(item)
        known[mode] = {s for s, k in seen if k}
    return known


MODE_KNOWN = _mode_known()


def modes(state: State) -> list[Mode] | None:
    """The modes in which ``state`` is attacked; None when the mode is not known there (postcopy stands for all)."""
    found = [m for m in Mode if state in MODE_KNOWN[m]]
    return found or None


def path_labels(state: State, channel: Channel, mode: Mode) -> list[tuple[p.Role, str]]:
    """The moves of the shortest conversation on ``channel`` from START to ``state`` in ``mode``."""
    parent: dict[State, tuple[State, tuple[p.Role, str]] | None] = {State.START: None}
    frontier = [State.START]
    while frontier:
        s = frontier.pop(0)
        if s is state:
            break
        for (who, label), nxt in moves(s).items():
            if not in_mode(label, mode) or nxt in parent:
                continue
            if label.startswith("Hello(") and _hello_channel(label) is not channel:
                continue
            parent[nxt] = (s, (who, label))
            frontier.append(nxt)
    out: list[tuple[p.Role, str]] = []
    s = state
    while parent.get(s) is not None:
        s, move = parent[s]  # type: ignore[misc]
        out.append(move)
    return out[::-1]


def forbidden_controls(role: str, state: State, channel: Channel, mode: Mode) -> list[tuple[str, str]]:
    """Control messages the peer may not send where the honest side reads them, as (why picked, label):
    ``ahead``, the first one TABLE lets the peer send later; ``again``, one it sent before on this
    connection; ``role``, one only the honest side sends (an impostor)."""
    peer, honest = peer_role(role), honest_role(role)
    at = reading(role, state, mode)
    allowed = set(peer_moves(at, peer, mode))
    picks: list[tuple[str, str]] = []
    frontier, seen = [at], {at}
    while frontier and not picks:
        s = frontier.pop(0)
        for (who, label), nxt in moves(s).items():
            if not in_mode(label, mode):
                continue
            if who is peer and label not in allowed and label != "Error":
                picks.append(("ahead", label))
                break
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    before = [label for who, label in path_labels(state, channel, mode) if who is peer and label not in allowed]
    if before:
        picks.append(("again", before[-1]))
    own = [label for (who, label) in moves(at) if who is honest and in_mode(label, mode)]
    own += [label for s in p.TABLE for (who, label) in moves(s) if who is honest and in_mode(label, mode)]
    picks.append(("role", own[0]))
    out, labels = [], set()
    for why, label in picks:
        if label not in labels:
            labels.add(label)
            out.append((why, label))
    return out


def forbidden_data(role: str, state: State, mode: Mode) -> list[str]:
    """Data frames the peer may not send where the honest side reads them, those it sends elsewhere first."""
    peer = peer_role(role)
    allowed = set(data_kinds(reading(role, state, mode), peer))
    return [k for k in DATA_PREFERENCE[peer] if k not in allowed]


# == the catalogue =====================================================================================
@dataclass(frozen=True)
class Attack:
    name: str
    kind: str  # link (recover or end in one line), violation (end in one line, promptly), tolerated (complete)
    sends: bool  # puts bytes on the connection: needs the honest side to read it
    roles: tuple[str, ...] = ("src", "dst")
    tls_layer: bool = False  # replaces the connection's TLS set-up: START only
    doc: str = ""


ATTACKS = {a.name: a for a in [
    Attack("reset", "link", False, doc="SO_LINGER 0, then close: a reset (before any byte: a port scan, nmap -sT)"),
    Attack("half-close", "link", False, doc="shutdown(SHUT_WR): EOF to the honest side, still reading"),
    Attack("silent", "link", False, doc="stop reading and writing this connection, keep it open"),
    Attack("drip", "link", True, doc="the next message the peer would send, one byte a second"),
    Attack("garbage", "link", True, doc="1 KiB whose first header names no frame kind"),
    Attack("max-length", "link", True, doc="a control frame of 65536 bytes (the most wire_check admits), not msgpack"),
    Attack("forbidden-control", "violation", True, doc="a well-formed control message the state forbids"),
    Attack("forbidden-data", "violation", True, doc="a well-formed data frame the state's mask forbids"),
    Attack("unasked", "tolerated", True, ("dst",), doc="replies carrying pages nobody requested (the right ones)"),
    Attack("unasked-then-cut", "tolerated", True, ("dst",),
           doc="unasked replies, then every link cut; the fake source serves the reconnection"),
    Attack("zeros-flood", "tolerated", True, ("dst",), doc="500 ZEROS frames over pages already present there"),
    Attack("open-twice", "link", False, ("src",), doc="a second connection says Hello for a channel that is up"),
    Attack("storm", "link", False,
           doc="cut, then a storm of reconnections (the fake source resets the next 6 it accepts)"),
    Attack("vanish", "link", False, doc="the peer's veth link goes down: no FIN, no RST, packets dropped"),
    Attack("tls-wrong-ca", "link", False, tls_layer=True, doc="a certificate from another CA (the destination retries)"),
    Attack("plaintext-vs-tls", "link", False, tls_layer=True, doc="a plaintext peer against a TLS one"),
    Attack("tls-vs-plaintext", "link", False, tls_layer=True, doc="a TLS peer against a plaintext one"),
    Attack("clienthello-silence", "link", False, ("src",), tls_layer=True, doc="a TLS ClientHello, then silence"),
]}
# What the honest side reads although TABLE gives the peer no move there: migrate-dst reads bulk after
# DestDone until the source closes it (skipping frames still in flight).
IMPLEMENTATION_READS = {("dst", BULK, State.STREAMED)}
# One state per phase of a conversation: the handshake, before the guest is described, before the
# switchover, in a round, in the stream, on the urgent connections.  "vanish" (each case needs two
# network namespaces and waits out its bound) and "storm" run there only, and so does TLS after the
# handshake; elsewhere "silent" (no FIN, no RST) stands for vanish, "reset" for storm, plaintext for TLS.
PHASES = {(state, ch) for state, ch in [
    (State.START, BULK), (State.CHALLENGED, BULK), (State.START, REQUESTS), (State.DESCRIBING, BULK),
    (State.AWAITING_CPU, BULK), (State.BETWEEN_ROUNDS, BULK), (State.ROUND, BULK), (State.STREAMING, BULK),
    (State.REQUESTING, REQUESTS), (State.REPLYING, REPLIES)]}
# Where each side's connection is before its Hello says which it is.
HANDSHAKE_STATES = (State.START, State.CHALLENGED)


@dataclass(frozen=True)
class Case:
    role: str
    state: State
    channel: Channel
    attack: str
    variant: str = ""
    transport: str = "plain"
    mode: Mode = Mode.postcopy

    @property
    def name(self) -> str:
        attack = f"{self.attack}({self.variant})" if self.variant else self.attack
        return f"{self.role}/{self.state.name}/{self.channel.value}/{attack}/{self.transport}/{self.mode.name}"

    @property
    def stranger(self) -> bool:
        """A connection to migrate-src that never joins a session (its first, bulk, before the Hello)."""
        return self.role == "src" and self.channel is BULK and self.state in HANDSHAKE_STATES

    @property
    def reads_at(self) -> State:
        return reading(self.role, self.state, self.mode)

    @property
    def spec(self) -> Attack:
        return ATTACKS[self.attack]


def prune(case: Case) -> str | None:
    """Why ``case`` is not run, or None to run it."""
    a, role, state, ch = case.spec, case.role, case.state, case.channel
    if state is State.ENDED:
        return "not reached: an Error ends the conversation on both sides at once; nothing after it is read"
    if role not in a.roles:
        return {"unasked": "migrate-src asks the destination nothing it could answer unasked",
                "unasked-then-cut": "migrate-src asks the destination nothing it could answer unasked",
                "zeros-flood": "a destination sends no pages",
                "open-twice": "only the destination opens connections",
                "clienthello-silence": "migrate-dst sends the ClientHello: a source silent after it is 'silent' "
                                       "at START over TLS"}[a.name]
    if a.tls_layer:
        if state is not State.START or ch is not BULK:
            return "a TLS-layer attack: on the first connection, before its handshake"
        wants = "plain" if a.name == "tls-vs-plaintext" else "tls"
        if case.transport != wants:
            return f"the honest side runs {'TLS' if wants == 'tls' else 'plaintext'} in this attack"
    if a.name == "vanish" and case.transport == "tls" and state not in HANDSHAKE_STATES:
        return "vanishing drops packets below TLS: the same as in plaintext"
    if a.name == "open-twice" and state in HANDSHAKE_STATES and not case.stranger:
        return "the channel has not said its Hello yet: a second connection is just another (storm)"
    if a.name == "open-twice" and state is State.START:
        return "before the Challenge: a second connection is just another (storm)"
    if a.name in ("unasked", "unasked-then-cut") and (ch is not REPLIES or state is not State.REPLYING):
        return "answers come on the replies connection only (on bulk nothing is ever asked)"
    if a.name == "zeros-flood" and "ZEROS" not in data_kinds(state, S):
        return "ZEROS may not come here: that is forbidden-data"
    if a.sends:
        at = case.reads_at
        if (role, ch, at) not in IMPLEMENTATION_READS and not peer_active(at, peer_role(role), case.mode) \
                and not (role == "dst" and state is State.START) and not case.stranger:
            return (f"{prog(role)} reads nothing more on {ch.value} from here on (TABLE gives the "
                    f"{peer_role(role).value} no move in {at.name}, where it would read)")
        if role == "src" and state is State.START and a.name in ("forbidden-control", "forbidden-data"):
            return "the source reads no frame before it has sent its Challenge: the same as at CHALLENGED"
        if case.stranger and state is State.START and case.transport == "tls" and a.name == "max-length":
            return "before the TLS handshake every byte is TLS: covered by garbage"
    if modes(state) is None and case.mode is not Mode.postcopy:
        # The mode is not known yet: the same case as in postcopy, unless what the peer sends is read in
        # a state the mode decides (migrate-src's next read on bulk is a RoundAck only with rounds).
        first = next(m for m in Mode if reading(role, state, m) is case.reads_at)
        if not a.sends or first is not case.mode:
            return "the mode is not known on this connection yet (GuestInfo says it): the same as in postcopy"
    if a.name in ("forbidden-control", "forbidden-data") \
            and case.variant != _variants(role, state, ch, case.mode, a.name, False)[0]:
        if case.transport == "tls":
            return "over TLS a frame is the same once decrypted: the first variant stands for the others"
        if case.mode is not (modes(state) or [Mode.postcopy])[0]:
            return "every variant runs in the state's first mode; the first variant stands for them here"
    if a.name in ("vanish", "storm") and (state, ch) not in PHASES:
        return f"{a.name} runs at one state per phase (PHASES); here " \
               f"'{'silent' if a.name == 'vanish' else 'reset'}' stands for it"
    if case.transport == "tls" and (state, ch) not in PHASES and state not in HANDSHAKE_STATES + (
            State.NEW_SESSION, State.REJOINING, State.REQUESTS_HELLO, State.REPLIES_HELLO):
        return "after the handshake TLS carries the same frames to the same parser: TLS runs at one state " \
               "per phase (PHASES)"
    return None


def generate(full: bool = True) -> tuple[list[Case], list[tuple[Case, str]]]:
    """Every case, from TABLE: those to run, and those pruned with their reason.

    ``full`` false keeps one variant of each forbidden-message attack (the first) instead of each.
    """
    run: list[Case] = []
    skipped: list[tuple[Case, str]] = []
    for role in ("src", "dst"):
        for state in State:
            for ch in channels(state):
                for mode in (modes(state) or list(Mode)):
                    for transport in ("plain", "tls"):
                        for attack in ATTACKS:
                            for variant in _variants(role, state, ch, mode, attack, full):
                                case = Case(role, state, ch, attack, variant, transport, mode)
                                why = prune(case)
                                (skipped.append((case, why)) if why else run.append(case))
    return run, skipped


def _variants(role: str, state: State, ch: Channel, mode: Mode, attack: str, full: bool) -> list[str]:
    if state is State.ENDED:
        return [""]
    if attack == "forbidden-control":
        labels = [label for _, label in forbidden_controls(role, state, ch, mode)]
    elif attack == "forbidden-data":
        labels = forbidden_data(role, state, mode)
    else:
        return [""]
    return (labels if full else labels[:1]) or [""]


# Cases that show a known defect, in the quick subset whatever the rotation picks.
WITNESSES = [
    "src/START/bulk/reset/plain/postcopy",  # a port scan's reset kills migrate-src (MSG_PEEK in _first_bytes)
    "src/START/bulk/tls-wrong-ca/tls/postcopy",  # a spin in the source's trio thread
    "src/START/bulk/plaintext-vs-tls/tls/postcopy",
    "src/CHALLENGED/bulk/garbage/tls/postcopy",
    "dst/AWAITING_CPU/bulk/forbidden-data(PAGES)/plain/postcopy",  # a lost link, not a violation
    "dst/STREAMING/bulk/forbidden-data(DISCARD)/plain/postcopy",
    "dst/REPLYING/replies/unasked-then-cut/plain/postcopy",  # OverflowError after the reconnection
    "dst/DESCRIBING/bulk/silent/plain/postcopy",  # no bound on the GuestInfo
    "dst/AWAITING_CPU/bulk/vanish/plain/postcopy",  # no bound before the switchover
    "dst/START/bulk/tls-wrong-ca/tls/postcopy",
    "dst/STREAMING/bulk/zeros-flood/plain/postcopy",
    "dst/ROUND/bulk/drip/plain/hybrid",  # a drip is never silent: the destination waited for ever
    "dst/AWAITING_CPU/bulk/silent/plain/postcopy",  # a live source that never begins: --switchover-timeout
    "src/ROUND_ENDED/bulk/silent/plain/hybrid",  # no bound on the RoundAck
    "src/START/bulk/half-close/tls/postcopy",  # the TLS spin, without a certificate at all
]
QUICK_ROTATION = ["reset", "silent", "garbage", "forbidden-control", "forbidden-data", "drip", "half-close",
                  "max-length", "storm", "open-twice", "unasked", "zeros-flood"]


def quick(cases: list[Case]) -> list[Case]:
    """A few minutes' worth: each (role, state) once, plaintext, its first mode and channel in turn, attacks
    in rotation (each attack comes up), and the WITNESSES."""
    by_name = {c.name: c for c in cases}
    picked: dict[str, Case] = {n: by_name[n] for n in WITNESSES if n in by_name}
    turn = 0
    for role in ("src", "dst"):
        for state in State:
            group = [c for c in cases if c.role == role and c.state is state and c.transport == "plain"
                     and c.mode is (modes(state) or [Mode.postcopy])[0]]
            if not group:
                continue
            chans = sorted({c.channel for c in group}, key=list(Channel).index)
            ch = chans[turn % len(chans)]
            for k in range(len(QUICK_ROTATION)):
                name = QUICK_ROTATION[(turn + k) % len(QUICK_ROTATION)]
                hit = [c for c in group if c.attack == name and c.channel is ch]
                if hit:
                    picked.setdefault(hit[0].name, hit[0])
                    break
            turn += 1
    return sorted(picked.values(), key=sort_key)


def sort_key(case: Case) -> tuple:
    return (case.role != "src", list(State).index(case.state), list(Channel).index(case.channel),
            list(ATTACKS).index(case.attack), case.variant, case.transport, int(case.mode))


# == the machinery: certificates, namespaces, honest processes, CPU time ===============================
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


class Netns:
    """Two network namespaces of ours joined by a veth pair: the honest side in ``a`` (HOST_A), the fake
    peer's sockets in ``b`` (HOST_B).  ``down()`` sets the fake peer's end down: it vanishes."""

    def __init__(self, tag: str) -> None:
        self.a, self.b = f"uatk{tag}a", f"uatk{tag}b"
        self.va, self.vb = f"uatk{tag}x", f"uatk{tag}y"

    async def __aenter__(self) -> Netns:
        for ns in (self.a, self.b):
            await _ip("netns", "add", ns)
        await _ip("link", "add", self.va, "netns", self.a, "type", "veth", "peer", "name", self.vb, "netns", self.b)
        for ns, dev, addr in ((self.a, self.va, HOST_A), (self.b, self.vb, HOST_B)):
            await _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            await _ip("-n", ns, "link", "set", dev, "up")
            await _ip("-n", ns, "link", "set", "lo", "up")
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            for ns in (self.a, self.b):
                await _ip("netns", "del", ns, check=False)

    async def down(self) -> None:
        await _ip("-n", self.b, "link", "set", self.vb, "down")

    async def up(self) -> None:
        await _ip("-n", self.b, "link", "set", self.vb, "up")

    def exec_a(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.a, *argv]

    def exec_b(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.b, *argv]

    async def socket_b(self, listen: bool = False) -> trio.socket.SocketType:
        """A TCP socket of namespace ``b`` (made in a thread of its own that enters ``b`` and comes back):
        listening on HOST_B, or to connect from there."""
        made: list[stdsocket.socket] = []
        errors: list[BaseException] = []

        def make() -> None:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            there = os.open(f"/run/netns/{self.b}", os.O_RDONLY)
            try:
                if _libc.setns(there, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                try:
                    s = stdsocket.socket()
                    if listen:
                        s.bind((HOST_B, 0))
                        s.listen(64)
                    made.append(s)
                finally:
                    if _libc.setns(home, CLONE_NEWNET) != 0:
                        os._exit(99)  # a thread stuck in another namespace would poison everything after
            except BaseException as exc:  # noqa: BLE001 - handed to the trio task
                errors.append(exc)
            finally:
                os.close(home)
                os.close(there)

        def in_thread() -> None:
            t = threading.Thread(target=make)
            t.start()
            t.join()

        await trio.to_thread.run_sync(in_thread)
        if errors:
            raise errors[0]
        return trio.socket.from_stdlib_socket(made[0])


async def _ip(*args: str, check: bool = True) -> None:
    await trio.run_process(["ip", *args], check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Honest:
    """A real migrate-src or migrate-dst: its process, stderr (a file) and metrics, and its CPU time sampled."""

    def __init__(self, name: str, proc: trio.Process, tmp: Path, tag: str) -> None:
        self.name, self.proc, self.tmp, self.tag = name, proc, tmp, tag
        self.samples: list[tuple[float, float]] = []
        self.killed = False
        self.ended_at: float | None = None

    @classmethod
    async def start(cls, name: str, args: list[str], tmp: Path, tag: str, ns: Netns | None = None) -> Honest:
        argv = [str(BIN / name), *args, "--metrics", str(tmp / f"{tag}.json")]
        if ns is not None:
            argv = ns.exec_a(argv)
        with open(tmp / f"{tag}.err", "w") as err:
            proc = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=err)
        return cls(name, proc, tmp, tag)

    @property
    def running(self) -> bool:
        if self.proc.poll() is None:
            return True
        if self.ended_at is None:
            self.ended_at = trio.current_time()
        return False

    @property
    def rc(self) -> int | None:
        return self.proc.returncode

    def err(self) -> str:
        return (self.tmp / f"{self.tag}.err").read_text(errors="replace")

    def metrics(self) -> dict:
        path = self.tmp / f"{self.tag}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    async def ready_port(self, timeout: float = 20) -> int:
        ready = self.tmp / f"{self.tag}.ready"
        with trio.fail_after(timeout):
            while not (ready.exists() and ready.read_text().strip()):
                if not self.running:
                    raise RuntimeError(f"{self.name} ended before listening: {last_line(self.err())}")
                await trio.sleep(0.05)
        return int(ready.read_text().strip().rsplit(":", 1)[1])

    async def sample(self) -> None:
        """Records (time, CPU seconds) every 0.25 s while the process lives."""
        while (cpu := cpu_seconds(self.proc.pid)) is not None and self.running:
            self.samples.append((trio.current_time(), cpu))
            await trio.sleep(0.25)

    def spin(self, since: float, until: float | None = None) -> str | None:
        """A spin after ``since`` (and before ``until``): over some SPIN_WINDOW_S, more than SPIN_SHARE of a core."""
        pts = [(t, c) for t, c in self.samples if t >= since and (until is None or t <= until)]
        worst = None
        for i, (t0, c0) in enumerate(pts):
            for t1, c1 in pts[i + 1:]:
                if t1 - t0 >= SPIN_WINDOW_S:
                    share = (c1 - c0) / (t1 - t0)
                    if share > SPIN_SHARE and (worst is None or share > worst[0]):
                        worst = (share, t1 - t0, t0 - since)
                    break
        if worst is None:
            return None
        return f"{self.name} spun: {worst[0]:.0%} of a core for {worst[1]:.1f} s, {worst[2]:.1f} s after the attack"

    async def wait(self, until: float) -> bool:
        """Waits for the process to end until ``until`` (trio's clock); True if it did."""
        with trio.move_on_at(until):
            await self.proc.wait()
        return not self.running

    async def stop(self) -> None:
        """Kills it if it still runs (it overran its bound: counted by the caller)."""
        with trio.CancelScope(shield=True):
            if self.proc.poll() is None:
                self.killed = True
                self.proc.kill()
                await self.proc.wait()


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing on stderr)"


def traceback_of(err: str) -> str | None:
    """The exception line of the last traceback in ``err``, if there is one."""
    if "Traceback" not in err:
        return None
    found = re.findall(r"^[\s|+]*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Group)\b.*)$",
                       err[err.index("Traceback"):], re.MULTILINE)
    return found[-1].strip() if found else last_line(err)


def one_line(err: str, name: str) -> str | None:
    """Why stderr does not end with exactly one ``name: error: ...`` line (and an optional hint); None if it does."""
    errors = [line for line in err.splitlines() if line.startswith(f"{name}: error:")]
    if len(errors) != 1:
        return f"{len(errors)} error lines, last line: {last_line(err)}"
    lines = [line for line in err.splitlines() if line.strip()]
    tail = lines[-2:] if lines[-1].startswith(f"{name}: hint:") else lines[-1:]
    if tail[0] != errors[0]:
        return f"the error line is not the last: {last_line(err)}"
    return None


LOST = {"src": "lost the destination", "dst": "lost the source"}  # the honest sides' recovery lines


# == a fake peer's connections ==========================================================================
class _LinkLost(Exception):
    """One of the fake peer's connections failed in honest use (reset, closed, malformed)."""


class _Refused(_LinkLost):
    """The honest side answered with an Error frame."""


class _Stop(Exception):
    """The fake peer cannot go on (it vanished, or was refused for good): it holds what it has."""


class _Abandoned(Exception):
    """The attack left a connection still in its handshake: a real peer would give up on it and retry."""

    def __init__(self, link: Link) -> None:
        super().__init__("abandoned")
        self.link = link


def frame(event: p.Event) -> bytes:
    return b"".join(bytes(c) for c in codec.encode(event))


def max_frame() -> bytes:
    """A control frame as long as wire_check admits, whose body is no msgpack (0xc1 is never used)."""
    return codec.header(lib.WIRE_CONTROL, codec.MAX_CONTROL) + b"\xc1" * codec.MAX_CONTROL


def hard_reset(sock: trio.socket.SocketType) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: trio.socket.SocketType) -> bool:
    """Whether the other end closed or reset ``sock``, without reading from it."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


async def wait_closed_by_peer(sock: trio.socket.SocketType, limit: float) -> float | None:
    """Seconds until the other end closed ``sock`` (None if it did not within ``limit``); nothing is read."""
    t0 = trio.current_time()
    while trio.current_time() - t0 < limit:
        if closed_by_peer(sock):
            return trio.current_time() - t0
        await trio.sleep(0.05)
    return None


class Link:
    """One connection of a fake peer: honest sends and receives through its FrameSocket (and so its
    protocol state), raw bytes for attacks.  The task that uses it runs inside ``own()``: abandoning
    the link cancels that task and leaves the connection as the attack made it."""

    def __init__(self, fs: FrameSocket, channel: Channel) -> None:
        self.fs, self.channel = fs, channel
        self.abandoned = False
        self.closed = False
        self.scope = trio.CancelScope()
        self.present = bytearray(PAGES)  # the fake source: pages this connection placed there (by construction)

    @property
    def state(self) -> State:
        return self.fs.conn.state

    def own(self) -> trio.CancelScope:
        self.scope = trio.CancelScope()
        if self.abandoned:
            self.scope.cancel()
        return self.scope

    async def _io(self, op: Awaitable) -> object:
        try:
            return await op
        except PeerGone as exc:
            raise _LinkLost(str(exc)) from None
        except PeerError as exc:
            raise _Refused(str(exc)) from None
        except (MigrateError, OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise _LinkLost(f"{type(exc).__name__}: {exc}") from None

    async def send(self, event: p.Event) -> None:
        await self._io(self.fs.send(event))

    async def recv(self) -> p.Event:
        return await self._io(self.fs.receive())  # type: ignore[return-value]

    async def expect(self, cls: type) -> p.Event:
        event = await self.recv()
        if not isinstance(event, cls):
            raise _LinkLost(f"expected {cls.__name__}, got {type(event).__name__}")
        return event

    async def raw(self, data: bytes, preamble: bool = True) -> None:
        """Writes ``data`` past the protocol state (ours would refuse it), after our preamble if it is due."""
        if preamble:
            data = self.fs.conn.preamble() + data
        await self._io(self.fs._write([data]))

    async def start_tls(self, cfg: TlsConfig, host: str | None) -> None:
        await self._io(self.fs.start_tls(cfg, host))

    async def send_preamble(self) -> None:
        await self._io(self.fs.send_preamble())

    def reset(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.fs.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
            self.fs.close()

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.sock.shutdown(stdsocket.SHUT_WR)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.fs.close()

    def abandon(self) -> None:
        self.abandoned = True
        self.scope.cancel()


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    """The exception a fake peer acts on, from a nursery's group: _Stop first, then _LinkLost."""
    for kind in (_Stop, _LinkLost):
        match, _ = group.split(kind)
        while isinstance(match, BaseExceptionGroup):
            match = match.exceptions[0]
        if match is not None:
            return match
    return group


def absent_runs(present: bytearray) -> list[tuple[int, int]]:
    runs, i, n = [], 0, len(present)
    while i < n:
        if present[i]:
            i += 1
            continue
        j = i
        while j < n and not present[j]:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


class Peer:
    """What both fake peers share: the tap that fires the attack once, and the attacks themselves."""

    role = ""

    def __init__(self, case: Case, env: Env, ns: Netns | None) -> None:
        self.case, self.env, self.ns = case, env, ns
        self.key = env.key if ns is not None else b""  # a plaintext source listens off loopback only with a key
        self.fired_at: float | None = None
        self.on_fire: Callable[[], None] = lambda: None
        self.reached: list[str] = []
        self.nursery: trio.Nursery | None = None
        self.session = b""
        self.info: p.GuestInfo | None = None
        self.round = 0
        self.paired = False
        self.links: dict[Channel, Link] = {}
        self.made: list[Link] = []  # every connection, kept (and so kept open) until the case ends
        self.note = ""
        self.struck = trio.Event()

    def _link(self, sock: trio.socket.SocketType, channel: Channel) -> Link:
        own = S if self.role == "dst" else D
        name = "destination" if own is S else "source"
        link = Link(FrameSocket(sock, p.Connection(own, self.info), name), channel)
        self.made.append(link)
        return link

    def close_all(self) -> None:
        for link in self.made:
            link.close()

    async def tap(self, channel: Channel, state: State, link: Link) -> None:
        """The conversation on ``channel`` has reached ``state`` (as this peer sees it): the case's attack
        fires here, the first time."""
        if len(self.reached) < 64:
            self.reached.append(f"{channel.value}:{state.name}")
        if self.fired_at is not None or channel is not self.case.channel or state is not self.case.state:
            return
        if link.state is not state:
            raise RuntimeError(f"tapped {state.name} with the connection in {link.state.name}")
        self.fired_at = trio.current_time()
        self.on_fire()
        try:
            await self.strike(link)
        finally:
            self.struck.set()
        if link.abandoned:
            await trio.lowlevel.checkpoint()  # the owner of the link stops here, before its next step

    async def strike(self, link: Link) -> None:
        a = self.case.attack
        if a == "reset":
            link.reset()
            link.abandon()
        elif a == "half-close":
            link.half_close()
            link.abandon()
        elif a == "silent":
            link.abandon()
        elif a == "drip":
            data = link.fs.conn.preamble() + self.next_message(link)
            link.abandon()
            assert self.nursery is not None
            self.nursery.start_soon(self._drip, link, data)
        elif a == "garbage":
            await link.raw(GARBAGE, preamble=False)
            link.abandon()
        elif a == "max-length":
            await link.raw(max_frame())
            link.abandon()
        elif a == "forbidden-control":
            await link.raw(frame(self.event(self.case.variant)))
        elif a == "forbidden-data":
            await link.raw(self.data_frame(self.case.variant))
        elif a == "vanish":
            assert self.ns is not None
            await self.ns.down()
            raise _Stop("vanished")
        else:
            await self.strike_more(link)

    async def strike_more(self, link: Link) -> None:
        """The attacks one role has (and the TLS-layer ones, set up before the tap)."""

    @staticmethod
    async def _drip(link: Link, data: bytes) -> None:
        for i in range(len(data)):
            try:
                await link.raw(data[i:i + 1], preamble=False)
            except _LinkLost:
                return
            await trio.sleep(DRIP_EVERY_S)

    def next_message(self, link: Link) -> bytes:
        """What this peer would honestly send next where the honest side reads (for drip)."""
        peer, at = peer_role(self.case.role), self.case.reads_at
        labels = peer_moves(at, peer, self.case.mode)
        if labels:
            return frame(self.event(labels[0]))
        kinds = data_kinds(at, peer)
        return self.data_frame(kinds[0]) if kinds else frame(p.Error("dripped"))

    def content(self, start: int, count: int) -> bytes:
        return bytes(count * p.PAGE_SIZE)

    def cpu_state(self) -> p.CpuState:
        return p.CpuState(((1, 0, 0),) * VCPUS)

    def event(self, label: str) -> p.Event:
        """A well-formed message of TABLE's ``label`` (proofs aside, which come after the order's check)."""
        info = self.info or p.GuestInfo(PAGES, VCPUS, int(WORKLOAD), SEED, ZERO_PERMILLE, RATE, self.case.mode)
        session = self.session or bytes(16)
        if label == "Challenge":
            return p.Challenge(p.new_nonce())
        if label.startswith("Hello("):
            return p.Hello(_hello_channel(label), session if "join" in label else b"", p.new_nonce(), bytes(32))
        if label == "Welcome":
            return p.Welcome(session, bytes(32))
        if label.startswith("GuestInfo("):
            return dataclasses.replace(info, mode=Mode.postcopy if "postcopy" in label else Mode.hybrid)
        if label == "CpuState":
            return self.cpu_state()
        if label.startswith("Round("):
            return p.Round(self.round + 1, 0, final=True)
        if label == "Round":
            return p.Round(self.round + 1, 1)
        if label == "RoundEnd":
            return p.RoundEnd(max(self.round, 1))
        if label == "RoundAck":
            return p.RoundAck(max(self.round, 1))
        if label == "Resume(more)":
            return p.Resume(((0, 1),), more=True)
        if label == "Resume(started)":
            return p.Resume((), started=True)
        if label.startswith("Resume("):
            return p.Resume(())
        if label == "Running":
            return p.Running()
        if label == "Downtime":
            return p.Downtime(0)
        if label == "SourceDone":
            return p.SourceDone(0)
        if label == "DestDone":
            return p.DestDone({})
        raise ValueError(label)

    def data_frame(self, kind: str) -> bytes:
        """A well-formed data frame of ``kind`` for page 0 (its true content, from the fake source)."""
        if kind in ("PAGES", "REPLACE"):
            return frame(p.PageRun(0, 1, self.content(0, 1), replace=kind == "REPLACE"))
        if kind == "ZEROS":
            return frame(p.ZeroRun(0, 1))
        if kind == "DISCARD":
            return frame(p.Discard(0, 1))
        return frame(p.PageRequest(((0, 1),), lib.mono_ns()))


# == the fake source, against a real migrate-dst ========================================================
class FakeSource(Peer):
    """A small, honest source: the guest's real pages and CPU state (a filled guest that never runs),
    postcopy or rounds, requests answered, reconnections served (the destination's Resume says what to
    send).  A rejoined bulk connection starts a new generation: the session goes on from its Resume."""

    role = "dst"

    def __init__(self, case: Case, env: Env, ns: Netns | None) -> None:
        super().__init__(case, env, ns)
        self.spec = GuestSpec(PAGES, VCPUS, WORKLOAD, SEED, ZERO_PERMILLE, RATE)
        self.guest = Guest(self.spec, fill=True)
        self.states = tuple(self.guest.export_state())
        self.info = p.GuestInfo(PAGES, VCPUS, int(WORKLOAD), SEED, ZERO_PERMILLE, RATE, case.mode)
        self.session = secrets.token_bytes(16)
        self.described = False
        self.generation = 0
        self.changed = trio.Event()
        self.driver_scope = trio.CancelScope()
        self.refuse = 0  # storm: connections reset as soon as accepted
        self.precut = case.state in (State.REJOINING, State.RESUMING)
        self.cut_done = False
        self.first_request = trio.Event()
        self.done = trio.Event()
        self.streamed = trio.Event()
        self.completed = False
        self.final_set = [(0, PAGES // 4)]  # the switchover's pages: discarded (hybrid), copied again (precopy)
        a, tls = case.attack, case.transport == "tls"
        if a == "plaintext-vs-tls":
            self.tls = None
        elif a == "tls-vs-plaintext":
            self.tls = env.pki.config(True, "src")
        elif a == "tls-wrong-ca":
            self.tls = env.other.config(True, "src")
        else:
            self.tls = env.pki.config(True, "src") if tls else None
        self.listener: trio.socket.SocketType | None = None

    def content(self, start: int, count: int) -> bytes:
        return bytes(ffi.buffer(ffi.cast("char *", self.guest.base + start * p.PAGE_SIZE), count * p.PAGE_SIZE))

    def cpu_state(self) -> p.CpuState:
        return p.CpuState(self.states)

    async def listen(self) -> tuple[str, int]:
        if self.ns is not None:
            self.listener = await self.ns.socket_b(listen=True)
            host = HOST_B
        else:
            self.listener = trio.socket.socket()
            await self.listener.bind(("127.0.0.1", 0))
            self.listener.listen(64)
            host = "127.0.0.1"
        return host, self.listener.getsockname()[1]

    def close(self) -> None:
        self.close_all()
        if self.listener is not None:
            self.listener.close()
        self.guest.close()

    async def serve(self) -> None:
        assert self.listener is not None
        try:
            async with trio.open_nursery() as n:
                self.nursery = n
                n.start_soon(self._driver)
                while True:
                    sock, _ = await self.listener.accept()
                    if self.refuse:
                        self.refuse -= 1
                        hard_reset(sock)
                        continue
                    n.start_soon(self._greet, sock)
        except BaseExceptionGroup as group:
            exc = _unwrap(group)
            if not isinstance(exc, _Stop):
                raise
        except _Stop:
            pass
        await trio.sleep_forever()  # vanished: hold every socket as it is until the case ends

    def _expected(self) -> Channel:
        return next((ch for ch in (BULK, REQUESTS, REPLIES) if ch not in self.links), BULK)

    async def _greet(self, sock: trio.socket.SocketType) -> None:
        expected = self._expected()
        link = self._link(sock, expected)
        with link.own():
            try:
                await self.tap(expected, State.START, link)
                if self.tls is not None:
                    await link.start_tls(self.tls, None)
                challenge = p.Challenge(p.new_nonce())
                await link.send(challenge)
                await self.tap(expected, State.CHALLENGED, link)
                hello = await link.expect(p.Hello)
                ch, join = hello.channel, bool(hello.session)
                link.channel = ch
                await self.tap(ch, link.state, link)
                if (not join and (ch is not BULK or self.described)) or (join and hello.session != self.session):
                    await link.send(p.Error("a migration is already in progress" if not join else "unknown session"))
                    link.close()
                    return
                p.check_hello(self.key, challenge, hello)
                await link.send(p.welcome(self.key, challenge, hello, self.session))
                if ch is BULK and not join:
                    await self.tap(BULK, State.DESCRIBING, link)
                    await link.send(self.info)
                    self.described = True
                if ch is BULK and join:
                    await self.tap(BULK, State.RESUMING, link)
                self._register(ch, link, rejoin=ch is BULK and join)
            except (_LinkLost, MigrateError):
                link.close()

    def _register(self, ch: Channel, link: Link, rejoin: bool) -> None:
        if rejoin:  # the destination lost its links: a new generation of the session
            for old in self.links.values():
                if not old.abandoned:
                    old.close()
            self.links = {}
            self.generation += 1
            self.driver_scope.cancel()
        elif ch in self.links and not self.links[ch].abandoned:
            self.links[ch].close()  # a channel opened again (a retry)
        self.links[ch] = link
        old_event, self.changed = self.changed, trio.Event()
        old_event.set()

    async def _driver(self) -> None:
        while True:
            while len(self.links) < 3:
                await self.changed.wait()
            gen, links = self.generation, dict(self.links)
            self.paired = True
            with trio.CancelScope() as scope:
                self.driver_scope = scope
                if self.generation != gen:
                    scope.cancel()
                try:
                    await self._session(links, resumed=gen > 0)
                    self.completed = True
                    for link in links.values():
                        link.close()  # the destination waits for the source to close first
                    return
                except _LinkLost:
                    if self.generation == gen:
                        for link in links.values():
                            if not link.abandoned:
                                link.close()
                        self.links = {ch: link for ch, link in self.links.items() if link not in links.values()}

    async def _session(self, links: dict[Channel, Link], resumed: bool) -> None:
        bulk, reqs, reps = links[BULK], links[REQUESTS], links[REPLIES]
        remaining: list[tuple[int, int]] = []
        with bulk.own() as scope:
            resume = await self._read_resume(bulk) if resumed else None
            if resume is None or not resume.started:
                remaining = await self._switchover(bulk, resume)
            else:
                remaining = list(resume.runs)
        if scope.cancelled_caught:
            await trio.sleep_forever()  # bulk was abandoned: the destination has to come back
        self.done, self.streamed = trio.Event(), trio.Event()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._serve_requests, reqs, reps)
                n.start_soon(self._stream, bulk, remaining)
                await self.done.wait()
                with trio.move_on_after(1):  # DestDone may come first (precopy): the stream ends all the same
                    await self.streamed.wait()
                n.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    async def _read_resume(self, bulk: Link) -> p.Resume:
        runs: list[tuple[int, int]] = []
        while True:
            resume = await bulk.expect(p.Resume)
            runs += resume.runs
            if not resume.more:
                return p.Resume(tuple(runs), started=resume.started)

    async def _switchover(self, bulk: Link, resume: p.Resume | None) -> list[tuple[int, int]]:
        """The rounds (with rounds) and the CPU state; returns what the postcopy stream then sends."""
        absent = list(resume.runs) if resume is not None else []
        if self.case.mode is Mode.postcopy:
            await self.tap(BULK, State.AWAITING_CPU, bulk)
            await bulk.send(self.cpu_state())
            await self._reported(bulk)
            return absent if resume is not None else [(0, PAGES)]
        await self.tap(BULK, State.BETWEEN_ROUNDS, bulk)
        self.round += 1
        await bulk.send(p.Round(self.round, PAGES))
        await self._send_runs(bulk, [(0, PAGES)], replace=self.round > 1, tap=State.ROUND)
        await bulk.send(p.RoundEnd(self.round))
        await self.tap(BULK, State.ROUND_ENDED, bulk)
        await bulk.expect(p.RoundAck)
        self.round += 1
        await bulk.send(p.Round(self.round, sum(n for _, n in self.final_set), final=True))
        await self.tap(BULK, State.FINAL_ROUND, bulk)
        if self.case.mode is Mode.hybrid:
            for start, count in self.final_set:
                await bulk.send(p.Discard(start, count))
                bulk.present[start:start + count] = bytes(count)
        else:
            await self._send_runs(bulk, self.final_set, replace=True)
        await bulk.send(self.cpu_state())
        await self._reported(bulk)
        return list(self.final_set) if self.case.mode is Mode.hybrid else []

    async def _reported(self, bulk: Link) -> None:
        """The destination's report that its vCPUs run, and the downtime in answer (as migrate-src)."""
        await self.tap(BULK, State.STARTING, bulk)
        await bulk.expect(p.Running)
        await self.tap(BULK, State.REPORTED, bulk)
        await bulk.send(p.Downtime(0))

    async def _send_runs(self, link: Link, runs: list[tuple[int, int]], replace: bool = False,
                         echo: int = 0, tap: State | None = None) -> None:
        """Page frames of at most 64 pages; the tap (and a cut before a rejoin) half-way."""
        total, sent, tapped = sum(n for _, n in runs), 0, tap is None
        for start, count in runs:
            for s in range(start, start + count, 64):
                n = min(64, start + count - s)
                await link.send(p.PageRun(s, n, self.content(s, n), echo=echo, replace=replace))
                link.present[s:s + n] = b"\x01" * n
                sent += n
                if not tapped and 2 * sent >= total:
                    tapped = True
                    await self._halfway(link, tap)  # type: ignore[arg-type]
        if not tapped:
            await self._halfway(link, tap)  # type: ignore[arg-type]

    async def _halfway(self, link: Link, state: State) -> None:
        await self.tap(BULK, state, link)
        cut_at = State.ROUND if self.case.mode is Mode.precopy else State.STREAMING
        if self.precut and not self.cut_done and state is cut_at:
            self.cut_done = True  # an honest cut, so that the destination rejoins (REJOINING, RESUMING)
            for other in list(self.links.values()):
                other.reset()
            raise _LinkLost("cut before the rejoin")

    async def _stream(self, bulk: Link, remaining: list[tuple[int, int]]) -> None:
        with bulk.own():
            if remaining:
                with trio.move_on_after(FIRST_REQUEST_S):
                    await self.first_request.wait()
                if self.case.channel is not BULK:
                    # Pages are still owed when an urgent channel is attacked, and for a second after: the
                    # guest is not complete before migrate-dst has read what the attack sent.
                    with trio.move_on_after(2):
                        await self.struck.wait()
                    await trio.sleep(1)
            await self._send_runs(bulk, remaining, tap=State.STREAMING)
            await bulk.send(p.SourceDone(sum(n for _, n in remaining)))
            await self.tap(BULK, State.STREAMED, bulk)
        self.streamed.set()

    async def _serve_requests(self, reqs: Link, reps: Link) -> None:
        with reqs.own(), reps.own():
            first = True
            while True:
                event = None
                if first:
                    with trio.move_on_after(FIRST_REQUEST_S + 0.2):
                        event = await reqs.recv()
                    if event is None:  # nothing faults (precopy: every page is there): reached all the same
                        first = False
                        await self.tap(REQUESTS, State.REQUESTING, reqs)
                        await self.tap(REPLIES, State.REPLYING, reps)
                        continue
                else:
                    event = await reqs.recv()
                if isinstance(event, p.PageRequest):
                    if first:
                        await self.tap(REQUESTS, State.REQUESTING, reqs)
                    self.first_request.set()
                    for start, count in event.runs:
                        await self._send_runs(reps, [(start, count)], echo=event.stamp)
                    if first:
                        first = False
                        await self.tap(REPLIES, State.REPLYING, reps)
                elif isinstance(event, p.DestDone):
                    await self.tap(REQUESTS, State.REQUESTS_DONE, reqs)
                    self.done.set()
                    return

    async def strike_more(self, link: Link) -> None:
        a = self.case.attack
        if a in ("unasked", "unasked-then-cut"):
            # The right pages, but nobody asked for them: more than the vCPUs will have asked for by the cut.
            await self._send_runs(link, [(PAGES - 128, 128)])
            self.note = "128 pages nobody asked for"
            if a == "unasked-then-cut":
                await trio.sleep(0.05)  # placed there before the cut (a reset drops what was not read yet)
                for other in list(self.links.values()):
                    other.reset()
                raise _LinkLost("cut after unasked replies")
        elif a == "zeros-flood":
            present = [i for i in range(PAGES) if link.present[i]]
            for k in range(500 if present else 0):
                await link.send(p.ZeroRun(present[k % len(present)], 1))
            self.note = f"500 ZEROS over {len(present)} present pages" if present else "no page present to flood"
        elif a == "storm":
            link.reset()
            link.abandon()
            self.refuse = 6


# == the fake destination, against a real migrate-src ===================================================
class FakeDestination(Peer):
    """A small, honest destination: keeps every page it receives, acknowledges rounds, obeys discards and
    replacements, asks for a page once the CPU state is in, says DestDone once every page is here, and
    rejoins (Resume: what it lacks) when the source ends its connections.  Before DestDone it proves
    what it received: the digest of its memory and the CPU state against a replay of the guest."""

    role = "src"

    def __init__(self, case: Case, env: Env, ns: Netns | None, port: int) -> None:
        super().__init__(case, env, ns)
        self.host = HOST_A if ns is not None else "127.0.0.1"
        self.port = port
        self.tls = env.pki.config(False, "dst") if case.transport == "tls" else None
        self.mem = bytearray()
        self.present = bytearray()
        self.cpu: p.CpuState | None = None
        self.started = False
        self.asked = False
        self.finished = False  # DestDone sent: the source's close is the end, not a loss
        self.verified: bool | None = None
        self.gave_up: str | None = None
        self.ended = trio.Event()
        self.closed_by_source = trio.Event()
        self.cpu_event = trio.Event()
        self.precut = case.state in (State.REJOINING, State.RESUMING)
        self.cut_done = False

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            self.nursery = n
            try:
                await self._run()
            except (_Stop, _LinkLost) as exc:
                self.gave_up = str(exc)
            self.ended.set()
            await trio.sleep_forever()  # every socket stays as it is until the case ends

    async def _run(self) -> None:
        self.links[BULK] = await self._open(BULK, b"", initial=True)
        self.links[REQUESTS] = await self._open(REQUESTS, self.session, initial=True)
        self.links[REPLIES] = await self._open(REPLIES, self.session, initial=True)
        self.paired = True
        for attempt in range(6):
            try:
                await self._session(first=attempt == 0)
                return
            except _LinkLost:
                if self.finished:
                    return
                for link in self.links.values():
                    if not link.abandoned:
                        link.close()
                await trio.sleep(0.2)  # as migrate-dst backs off; the source has seen the loss by then
                await self._rejoin()
        raise _Stop("the links failed 6 times")

    async def _connect(self) -> trio.socket.SocketType:
        try:
            if self.ns is not None:
                sock = await self.ns.socket_b()
            else:
                sock = trio.socket.socket()
            await sock.connect((self.host, self.port))
        except OSError as exc:
            raise _LinkLost(f"connect: {exc}") from None
        tune(sock, LINK_S)
        return sock

    async def _open(self, channel: Channel, session: bytes, initial: bool) -> Link:
        """Opens a connection of the session, retrying as migrate-dst does: a refusal (an Error) is final at
        first and retried when rejoining; a connection the attack left behind is given up once the source
        has dropped it."""
        deadline = trio.current_time() + CONNECT_S + (0 if initial else RECONNECT_S)
        delay = 0.05
        while True:
            try:
                return await self._open_once(channel, session)
            except _Abandoned as exc:  # as migrate-dst gives up an attempt after --link-timeout
                await wait_closed_by_peer(exc.link.fs.sock, LINK_S)
            except _Refused as exc:
                if initial:
                    raise _Stop(f"the source refused {channel.value}: {exc}") from None
            except _LinkLost:
                pass
            if trio.current_time() > deadline:
                raise _Stop(f"could not open {channel.value} by its deadline")
            await trio.sleep(delay)
            delay = min(2 * delay, 1.0)

    async def _open_once(self, channel: Channel, session: bytes) -> Link:
        link = self._link(await self._connect(), channel)
        try:
            with link.own() as scope:
                await self.tap(channel, State.START, link)
                if self.tls is not None:
                    await link.start_tls(self.tls, self.host)
                await link.send_preamble()
                challenge = await link.expect(p.Challenge)
                await self.tap(channel, State.CHALLENGED, link)
                hello = p.hello(self.key, channel, session, challenge)
                await link.send(hello)
                await self.tap(channel, link.state, link)
                welcome = await link.expect(p.Welcome)
                try:
                    p.check_welcome(self.key, challenge, hello, welcome)
                except MigrateError as exc:
                    raise _Refused(str(exc)) from None
                self.session = welcome.session  # type: ignore[attr-defined]
                if channel is BULK and not session:
                    await self.tap(BULK, State.DESCRIBING, link)
                    self._learn(await link.expect(p.GuestInfo))  # type: ignore[arg-type]
                return link
        except _LinkLost:
            link.close()
            raise
        assert scope.cancelled_caught
        raise _Abandoned(link)

    def _learn(self, info: p.GuestInfo) -> None:
        self.info = info
        self.mem = bytearray(info.pages * p.PAGE_SIZE)
        self.present = bytearray(info.pages)

    async def _rejoin(self) -> None:
        """After the source ended the session's connections: all three again, then Resume."""
        bulk = await self._open(BULK, self.session, initial=False)
        reqs = await self._open(REQUESTS, self.session, initial=False)
        reps = await self._open(REPLIES, self.session, initial=False)
        self.links = {BULK: bulk, REQUESTS: reqs, REPLIES: reps}
        with bulk.own():
            await self.tap(BULK, State.RESUMING, bulk)
            runs = absent_runs(self.present)
            for i in range(0, max(len(runs), 1), p.MAX_RESUME_RUNS):
                await bulk.send(p.Resume(tuple(runs[i:i + p.MAX_RESUME_RUNS]),
                                         more=i + p.MAX_RESUME_RUNS < len(runs), started=self.started))

    async def _session(self, first: bool) -> None:
        bulk, reqs, reps = self.links[BULK], self.links[REQUESTS], self.links[REPLIES]
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._bulk_reader, bulk, first)
                n.start_soon(self._replies_reader, reps)
                await self._requests_task(reqs)
                with trio.move_on_after(LINK_S + 1):  # DestDone sent: the source closes first
                    await self.closed_by_source.wait()
                n.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    async def _bulk_reader(self, bulk: Link, first: bool) -> None:
        assert self.info is not None
        with bulk.own():
            try:
                if first:
                    await self.tap(BULK, bulk.state, bulk)  # AWAITING_CPU, or BETWEEN_ROUNDS
                round_pages = got = streamed = 0
                while True:
                    event = await bulk.recv()
                    state = bulk.state
                    if isinstance(event, p.Round):
                        self.round = event.number
                        if event.final:
                            await self.tap(BULK, State.FINAL_ROUND, bulk)
                        else:
                            round_pages, got = event.pages, 0
                    elif isinstance(event, (p.PageRun, p.ZeroRun, p.Discard)):
                        self._store(event)
                        if state is State.ROUND:
                            got += event.count
                            if 2 * got >= round_pages:
                                await self.tap(BULK, State.ROUND, bulk)
                                await self._cut(State.ROUND)
                        elif state is State.STREAMING and self.info.mode is Mode.postcopy:
                            streamed += event.count
                            if 2 * streamed >= self.info.pages:
                                await self.tap(BULK, State.STREAMING, bulk)
                    elif isinstance(event, p.RoundEnd):
                        await self.tap(BULK, State.ROUND_ENDED, bulk)
                        await bulk.send(p.RoundAck(event.number))
                    elif isinstance(event, p.CpuState):
                        self.cpu, self.started = event, True
                        self.cpu_event.set()
                        await self.tap(BULK, State.STARTING, bulk)
                        await bulk.send(p.Running())  # as migrate-dst, once its vCPUs run
                        await self.tap(BULK, State.REPORTED, bulk)
                    elif isinstance(event, p.Downtime):
                        if self.info.mode is not Mode.postcopy:
                            await self.tap(BULK, State.STREAMING, bulk)
                        await self._cut(State.STREAMING)
                    elif isinstance(event, p.SourceDone):
                        await self.tap(BULK, State.STREAMED, bulk)
            except _LinkLost:
                if self.finished:
                    self.closed_by_source.set()
                    return
                raise

    async def _cut(self, state: State) -> None:
        assert self.info is not None
        cut_at = State.ROUND if self.info.mode is Mode.precopy else State.STREAMING
        if self.precut and not self.cut_done and state is cut_at:
            self.cut_done = True  # an honest cut, so that we rejoin (REJOINING, RESUMING)
            for link in self.links.values():
                link.reset()
            raise _LinkLost("cut before the rejoin")

    async def _replies_reader(self, reps: Link) -> None:
        with reps.own():
            try:
                while True:
                    self._store(await reps.recv())  # type: ignore[arg-type]
            except _LinkLost:
                if self.finished:
                    return
                raise

    def _store(self, event: p.PageRun | p.ZeroRun | p.Discard) -> None:
        size = p.PAGE_SIZE
        if isinstance(event, p.Discard):
            self.mem[event.start * size:(event.start + event.count) * size] = bytes(event.count * size)
            self.present[event.start:event.start + event.count] = bytes(event.count)
            return
        data = bytes(event.payload) if isinstance(event, p.PageRun) else bytes(event.count * size)
        for k in range(event.count):  # as the kernel does: a present page is kept unless replaced
            i = event.start + k
            if event.replace or not self.present[i]:
                self.mem[i * size:(i + 1) * size] = data[k * size:(k + 1) * size]
                self.present[i] = 1

    async def _requests_task(self, reqs: Link) -> None:
        assert self.info is not None
        with reqs.own() as scope:
            await self.cpu_event.wait()
            if not self.asked:
                self.asked = True
                await self.tap(REQUESTS, State.REQUESTING, reqs)
                await reqs.send(p.PageRequest(((self.info.pages - 1, 1),), lib.mono_ns()))
                await self.tap(REPLIES, State.REPLYING, self.links[REPLIES])
            while self.present.count(0):
                await trio.sleep(0.02)
            if self.verified is None:
                await self._verify()
            self.finished = True
            await reqs.send(p.DestDone({"pages_placed": float(self.info.pages)}))
            await self.tap(REQUESTS, State.REQUESTS_DONE, reqs)
        if scope.cancelled_caught:
            await trio.sleep_forever()  # no DestDone possible: the source has to end the session

    async def _verify(self) -> None:
        info, cpu = self.info, self.cpu
        assert info is not None and cpu is not None
        spec = GuestSpec(info.pages, info.vcpus, Workload(info.workload), info.seed, info.zero_permille, info.rate)
        digest, states = await trio.to_thread.run_sync(replay, spec, [s[1] for s in cpu.vcpus])
        buf = ffi.from_buffer(self.mem)
        got = lib.guest_digest(int(ffi.cast("uintptr_t", buf)), info.pages)
        self.verified = got == digest and [tuple(s) for s in cpu.vcpus] == [tuple(s) for s in states]

    async def strike_more(self, link: Link) -> None:
        a, ch = self.case.attack, link.channel
        if a == "open-twice":
            extra = self._link(await self._connect(), ch)
            try:
                if self.tls is not None:
                    await extra.start_tls(self.tls, self.host)
                await extra.send_preamble()
                challenge = await extra.expect(p.Challenge)
                await extra.send(p.hello(self.key, ch, self.session, challenge))
                answer = await extra.recv()
                self.note = f"the second {ch.value} got {type(answer).__name__}"
            except _LinkLost as exc:
                self.note = f"the second {ch.value}: {exc}"
            extra.close()
        elif a == "storm":
            link.reset()
            link.abandon()
            for _ in range(30):
                extra = self._link(await self._connect(), ch)
                with contextlib.suppress(_LinkLost):
                    if self.tls is not None:
                        await extra.start_tls(self.tls, self.host)
                    await extra.send_preamble()
                    challenge = await extra.expect(p.Challenge)
                    await extra.send(p.hello(self.key, ch, self.session, challenge))
                extra.reset()


# == outcomes ===========================================================================================
VERIFIED, ONE_LINE, FAILED = "completed+verified", "ended in one line", "FAILED"


@dataclass
class Result:
    case: Case
    outcome: str
    seconds: float | None  # from the attack to the outcome
    reasons: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED

    def line(self) -> str:
        c = self.case
        attack = f"{c.attack}({c.variant})" if c.variant else c.attack
        mode = c.mode.name if modes(c.state) or c.mode is not Mode.postcopy else "-"
        what = f"FAILED: {'; '.join(self.reasons)}" if self.failed else self.outcome
        took = f"{self.seconds:5.1f} s" if self.seconds is not None else "    -  "
        return f"{c.role:4}{c.state.name:15}{c.channel.value:9}{attack:46.46}{c.transport:6}{mode:9}{took}  {what}"


def bound(case: Case) -> tuple[float, str]:
    """How long after its attack the honest process may take to end, from the options that govern it."""
    if case.role == "dst":
        # A live source silent before the switchover is left at --switchover-timeout, counted from the
        # first connection: within the bound below, which covers a lost link's recovery.
        assert SWITCHOVER_S <= CONNECT_S + 2 * LINK_S + RECONNECT_S
        return (CONNECT_S + 2 * LINK_S + RECONNECT_S + MARGIN_S,
                f"--connect-timeout {CONNECT_S:g} + 2 x --link-timeout {LINK_S:g} + --reconnect-timeout "
                f"{RECONNECT_S:g} + {MARGIN_S:g} s (--switchover-timeout {SWITCHOVER_S:g} within it)")
    return (HANDSHAKE_S + 2 * LINK_S + RECONNECT_S + MARGIN_S,
            f"--handshake-timeout {HANDSHAKE_S:g} + 2 x --link-timeout {LINK_S:g} + --reconnect-timeout "
            f"{RECONNECT_S:g} + {MARGIN_S:g} s")


def read_in_session(case: Case) -> bool:
    """Whether what the attack sends is read by a session's own connection, past its handshake (a violation
    there ends the migration); one read in a handshake only ends that connection."""
    return case.reads_at not in (State.START, State.CHALLENGED, State.NEW_SESSION, State.REJOINING,
                                 State.REQUESTS_HELLO, State.REPLIES_HELLO, State.DESCRIBING)


def joined(src_err: str) -> bool:
    """Whether a destination ever had all its connections up at this source (by the source's own log)."""
    return "replies channel up" in src_err


def complete_before(case: Case) -> bool:
    """Whether migrate-dst has every page before it reads what the attack sent: after SourceDone, and in
    precopy from the CPU state on, it reads bulk only to see the source close it, skipping what comes."""
    return case.role == "dst" and (case.state is State.STREAMED or
                                   case.state is State.STREAMING and case.mode is Mode.precopy)


def error_line(err: str, name: str) -> str:
    """Its ``error:`` line, else its traceback's exception, else its last line."""
    return next((line for line in err.splitlines() if line.startswith(f"{name}: error:")),
                traceback_of(err) or last_line(err))


def lost_after(err: str, mark: int, role: str, expected: int) -> str | None:
    """The first recovery line the attack caused: after ``mark``, and past the ``expected`` ones (a cut of
    our own before a rejoin, which the honest side may log a moment after the attack)."""
    lines = [line for line in err.splitlines() if LOST[role] in line]
    before = sum(LOST[role] in line for line in err[:mark].splitlines())
    rest = lines[max(before, expected):]
    return rest[0] if rest else None


def judge(case: Case, h: Honest, fake: Peer, mark: int, legit: Legit | None = None) -> Result:
    """The checks every case gets: see the module's docstring."""
    name, err, reasons = h.name, h.err(), []
    limit, limit_text = bound(case)
    fired = fake.fired_at
    seconds = (h.ended_at - fired) if fired is not None and h.ended_at is not None else None
    if legit is not None and legit.ended_at is not None and fired is not None:
        seconds = legit.ended_at - fired
    if (tb := traceback_of(err)) is not None:
        reasons.append(f"traceback in {name}: {tb}")
    if fired is None:
        reasons.append(f"not reached: the fake peer saw {', '.join(fake.reached[-3:]) or 'nothing'}; {name} "
                       + (f"ended: {error_line(err, name)}" if h.rc is not None and not h.killed else "still ran"))
    elif h.killed:
        reasons.append(f"{name} still running {limit:g} s after the attack (bound: {limit_text}); killed")
    if fired is not None and (spin := h.spin(fired)):
        reasons.append(spin)
    outcome, detail = FAILED, fake.note
    if h.rc == 0 and not h.killed:
        if case.role == "dst":
            m = h.metrics()
            if m.get("verified") is not True or m.get("pages_placed") != m.get("pages_total"):
                reasons.append(f"exit 0 with verified={m.get('verified')!r} and {m.get('pages_placed')} of "
                               f"{m.get('pages_total')} pages placed")
            outcome = VERIFIED
        elif legit is not None:
            if legit.failure:
                reasons.append(legit.failure)
            outcome, detail = VERIFIED, "a legitimate destination arrived afterwards and verified"
        elif isinstance(fake, FakeDestination) and fake.verified:
            outcome = VERIFIED
        else:
            got = getattr(fake, "verified", None)
            reasons.append("migrate-src exited 0 but its destination " + (
                "received another guest than a replay gives" if got is False else "never had every page"))
    elif h.rc == 3:
        reasons.append("exit 3: the guest's memory or CPU state differs from a replay")
    elif h.rc is not None and not h.killed:
        if (why := one_line(err, name)) is not None and traceback_of(err) is None:
            reasons.append(f"{name} exited {h.rc} with {why}")
        outcome, detail = ONE_LINE, error_line(err, name)
        if legit is not None and legit.failure:
            reasons.append(legit.failure)
    a = case.spec
    if fired is not None and not h.killed:
        if case.role == "src" and not joined(err) and h.rc not in (0, None):
            reasons.append(f"migrate-src ended though no destination ever joined: {error_line(err, name)}")
        if a.kind == "violation" and (case.role == "dst" or read_in_session(case)):
            if (lost := lost_after(err, mark, case.role, int(getattr(fake, "cut_done", False)))) is not None:
                reasons.append(f"a protocol violation treated as a lost link: {lost.split(': ', 1)[-1]}")
            elif outcome == VERIFIED and not complete_before(case):
                reasons.append("a protocol violation did not end the migration: it completed (the violation was "
                               "retried as a lost link, or ignored)")
            elif outcome == ONE_LINE and seconds is not None and seconds > PROMPT_S:
                reasons.append(f"a protocol violation ended {name} only {seconds:.1f} s after it (at once: "
                               f"within {PROMPT_S:g} s)")
        if a.kind == "tolerated" and outcome != VERIFIED:
            reasons.append(f"a correct {name} absorbs this, the migration did not complete")
    if reasons:
        outcome = FAILED
    return Result(case, outcome, seconds, reasons, detail)


# == a legitimate destination ============================================================================
@dataclass
class Legit:
    rc: int | None
    err: str
    metrics: dict
    ended_at: float | None
    failure: str | None  # why it does not count as "got in and verified"


async def run_legit(env: Env, tmp: Path, host: str, port: int, transport: str, ns: Netns | None,
                    tag: str = "legit") -> Legit:
    """A real migrate-dst, verifying: it must get in and verify."""
    metrics = tmp / f"{tag}.json"
    argv = [str(BIN / "migrate-dst"), "--connect", f"{host}:{port}", "--verify", "--run-after", "0", *DST_OPTS,
            "--metrics", str(metrics), *(env.pki.args("dst") if transport == "tls" else []),
            *(["--key-file", str(env.key_file)] if ns is not None else [])]
    if ns is not None:
        argv = ns.exec_b(argv)
    proc = None
    with trio.move_on_after(CONNECT_S + 30):
        proc = await trio.run_process(argv, capture_stderr=True, check=False)
    ended = trio.current_time()
    if proc is None:
        return Legit(None, "", {}, None, "the legitimate destination did not finish within 33 s")
    err = proc.stderr.decode(errors="replace")
    (tmp / f"{tag}.err").write_text(err)
    try:
        m = json.loads(metrics.read_text())
    except (OSError, ValueError):
        m = {}
    failure = None
    if tb := traceback_of(err):
        failure = f"traceback in the legitimate migrate-dst: {tb}"
    elif proc.returncode != 0 or m.get("verified") is not True or m.get("pages_placed") != m.get("pages_total"):
        failure = f"the legitimate destination did not get in and verify: exit {proc.returncode}, " \
                  f"{error_line(err, 'migrate-dst') if proc.returncode else 'verified=' + repr(m.get('verified'))}"
    return Legit(proc.returncode, err, m, ended, failure)


# == the environment and the session cases ===============================================================
@dataclass
class Env:
    root: Path
    pki: Pki  # the migration's CA: its source certificate also names the veth addresses
    other: Pki  # another CA's, for the stranger it must refuse
    key_file: Path
    key: bytes
    serial: int = 0

    def unit_dir(self, name: str) -> Path:
        self.serial += 1
        slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:120]
        d = self.root / f"{self.serial:04d}-{slug}"
        d.mkdir(parents=True)
        return d

    def tag(self) -> str:
        self.serial += 1
        return f"{os.getpid() % 1000}{self.serial % 10000}"

    @classmethod
    def make(cls, root: Path) -> Env:
        pki, other = Pki(root / "pki", (HOST_A, HOST_B)), Pki(root / "other")
        key = secrets.token_hex(16).encode()
        key_file = root / "key"
        key_file.write_bytes(key + b"\n")
        return cls(root, pki, other, key_file, key)


def _netns(case: Case, env: Env) -> contextlib.AbstractAsyncContextManager:
    return Netns(env.tag()) if case.attack == "vanish" else contextlib.nullcontext()


def source_args(env: Env, tmp: Path, host: str, transport: str, ns: Netns | None, mode: Mode,
                run_before: float, pages: int = PAGES, extra: Iterable[str] = ()) -> list[str]:
    return ["--listen", f"{host}:0", "--ready-file", str(tmp / "src.ready"), "--guest-pages", str(pages),
            "--vcpus", str(VCPUS), "--rate", str(RATE), "--workload", WORKLOAD.name, "--seed", str(SEED),
            "--zero-fraction", f"{ZERO_PERMILLE / 1000:g}", "--mode", mode.name, "--run-before", f"{run_before:g}",
            *SRC_OPTS, *(env.pki.args("src") if transport == "tls" else []),
            *(["--key-file", str(env.key_file)] if ns is not None else []), *extra]


async def _until_end(h: Honest, fake: Peer, t0: float, stop_early: Callable[[], bool] = lambda: False) -> None:
    """Waits for the honest process to end, within the case's bound (from the attack) or REACH_S (before it)."""
    limit_s, _ = bound(fake.case)
    while h.running and not stop_early():
        limit = fake.fired_at + limit_s if fake.fired_at is not None else t0 + REACH_S
        if trio.current_time() >= limit:
            return
        with trio.move_on_after(0.1):
            await h.proc.wait()


async def run_dst_case(case: Case, env: Env) -> Result:
    """A fake source against a real migrate-dst."""
    tmp = env.unit_dir(case.name)
    async with _netns(case, env) as ns:
        fake = FakeSource(case, env, ns)
        try:
            host, port = await fake.listen()
            args = ["--connect", f"{host}:{port}", "--verify", "--run-after", "0", *DST_OPTS,
                    *(env.pki.args("dst") if case.transport == "tls" else []),
                    *(["--key-file", str(env.key_file)] if ns is not None else [])]
            dst = await Honest.start("migrate-dst", args, tmp, "dst", ns)
            mark = [0]
            fake.on_fire = lambda: mark.__setitem__(0, len(dst.err()))
            t0 = trio.current_time()
            async with trio.open_nursery() as n:
                n.start_soon(fake.serve)
                n.start_soon(dst.sample)
                await _until_end(dst, fake, t0)
                n.cancel_scope.cancel()
            await dst.stop()
        finally:
            fake.close()
    return judge(case, dst, fake, mark[0])


async def run_src_case(case: Case, env: Env) -> Result:
    """A fake destination against a real migrate-src; a legitimate destination afterwards when the fake one
    never joined (the source must still be serving)."""
    tmp = env.unit_dir(case.name)
    run_before = 1.5 if case.state in (State.AWAITING_CPU, State.BETWEEN_ROUNDS) else 0.3
    legit = None
    async with _netns(case, env) as ns:
        host = HOST_A if ns is not None else "127.0.0.1"
        src = await Honest.start("migrate-src", source_args(env, tmp, host, case.transport, ns, case.mode,
                                                            run_before), tmp, "src", ns)
        fake: FakeDestination | None = None
        try:
            port = await src.ready_port()
            fake = FakeDestination(case, env, ns, port)
            mark = [0]
            fake.on_fire = lambda: mark.__setitem__(0, len(src.err()))
            t0 = trio.current_time()
            async with trio.open_nursery() as n:
                n.start_soon(fake.run)
                n.start_soon(src.sample)
                await _until_end(src, fake, t0, lambda: fake.ended.is_set() and not joined(src.err()))
                if src.running and fake.ended.is_set() and not joined(src.err()):
                    # It never joined: once the source has dropped its half-open session, the next gets in.
                    await trio.sleep(HANDSHAKE_S + 1.5)
                    if ns is not None:
                        fake.close_all()
                        await ns.up()
                    legit = await run_legit(env, tmp, host, port, case.transport, ns)
                    await src.wait(trio.current_time() + LINK_S + MARGIN_S)
                n.cancel_scope.cancel()
        finally:
            await src.stop()
            if fake is not None:
                fake.close_all()
    if fake is None:
        return Result(case, FAILED, None, [f"migrate-src did not start: {last_line(src.err())}"])
    return judge(case, src, fake, mark[0], legit)


# == strangers: connections to migrate-src that never join ==============================================
class _StrangerFailed(Exception):
    pass


def client_hello() -> bytes:
    """A TLS 1.3 ClientHello's bytes (Python's ssl over memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@dataclass
class Stranger:
    """Where strangers connect, and how."""

    env: Env
    host: str
    port: int
    transport: str
    ns: Netns | None

    async def connect(self) -> trio.socket.SocketType:
        sock = await self.ns.socket_b() if self.ns is not None else trio.socket.socket()
        with trio.fail_after(5):
            await sock.connect((self.host, self.port))
        return sock

    async def challenged(self) -> tuple[Link, p.Challenge]:
        link = Link(FrameSocket(await self.connect(), p.Connection(D), "source"), BULK)
        if self.transport == "tls":
            await link.start_tls(self.env.pki.config(False, "dst"), self.host)
        await link.send_preamble()
        return link, await link.expect(p.Challenge)  # type: ignore[return-value]

    def hello(self, challenge: p.Challenge) -> p.Hello:
        return p.hello(self.env.key if self.ns is not None else b"", BULK, b"", challenge)


async def stranger(ctx: Stranger, case: Case) -> str:
    """One stranger's attack; returns a note, raises _StrangerFailed when the source mishandles it (it keeps
    the connection open past --handshake-timeout, or lets a stranger in)."""
    a, tls = case.attack, ctx.transport == "tls"
    hold = HANDSHAKE_S + MARGIN_S
    if a in ("tls-wrong-ca", "plaintext-vs-tls", "tls-vs-plaintext"):
        return await _stranger_process(ctx, a)
    if a == "open-twice":
        notes = []
        links = []
        for _ in range(2):
            link, challenge = await ctx.challenged()
            links.append(link)
            await link.send(ctx.hello(challenge))
            try:
                answer = await link.recv()
                notes.append(type(answer).__name__)
            except _LinkLost as exc:
                notes.append(str(exc)[:60])
        for link in links:
            link.close()
        return "two Hello(bulk, new): " + ", ".join(notes)
    if a == "storm":
        count = 60 if case.state is State.START else 20

        async def one() -> None:
            with contextlib.suppress(OSError, _LinkLost, trio.TooSlowError):
                if case.state is State.START:
                    sock = await ctx.connect()
                    await sock.send(client_hello() if tls else codec.preamble())
                    hard_reset(sock)
                else:
                    link, challenge = await ctx.challenged()
                    await link.send(ctx.hello(challenge))
                    link.reset()

        for i in range(0, count, 6):
            async with trio.open_nursery() as n:
                for _ in range(min(6, count - i)):
                    n.start_soon(one)
        return f"{count} connections in a storm"
    link = None
    if case.state is State.START:
        sock = await ctx.connect()
    else:
        link, challenge = await ctx.challenged()
        sock = link.fs.sock
    try:
        if a == "reset":
            hard_reset(sock)
            return "reset" + (" after the Challenge" if link else " at once (a port scan)")
        if a == "vanish":
            assert ctx.ns is not None
            await ctx.ns.down()
            await trio.sleep(HANDSHAKE_S + 1.5)
            hard_reset(sock)  # its RST goes nowhere: the link is down
            await ctx.ns.up()
            return "vanished"
        peer = Peer(case, ctx.env, ctx.ns)
        if a == "half-close":
            sock.shutdown(stdsocket.SHUT_WR)
        elif a == "garbage":
            await (link.raw(GARBAGE, preamble=False) if link else sock.send(GARBAGE))
        elif a == "max-length":
            await (link.raw(max_frame()) if link else sock.send(codec.preamble() + max_frame()))
        elif a == "forbidden-control":
            assert link is not None
            await link.raw(frame(peer.event(case.variant)))
        elif a == "forbidden-data":
            assert link is not None
            await link.raw(peer.data_frame(case.variant))
        elif a == "clienthello-silence":
            await sock.send(client_hello())
        elif a == "drip":
            data = (client_hello() if tls else codec.preamble() + frame(p.Hello(BULK, b"", bytes(32), bytes(32)))) \
                if link is None else frame(ctx.hello(challenge))

            async def drip() -> None:
                for i in range(len(data)):
                    with contextlib.suppress(OSError, _LinkLost):
                        await (link.raw(data[i:i + 1], preamble=False) if link else sock.send(data[i:i + 1]))
                    await trio.sleep(DRIP_EVERY_S)

            async with trio.open_nursery() as n:
                n.start_soon(drip)
                took = await wait_closed_by_peer(sock, hold)
                n.cancel_scope.cancel()
            if took is None:
                raise _StrangerFailed(f"migrate-src kept a dripping stranger's connection open over {hold:g} s "
                                      f"(--handshake-timeout {HANDSHAKE_S:g})")
            return f"dropped after {took:.1f} s"
        took = await wait_closed_by_peer(sock, hold)
        if took is None:
            raise _StrangerFailed(f"migrate-src kept the stranger's connection open over {hold:g} s "
                                  f"(--handshake-timeout {HANDSHAKE_S:g})")
        return f"closed after {took:.1f} s"
    finally:
        if link is not None:
            link.reset()
        else:
            hard_reset(sock)


async def _stranger_process(ctx: Stranger, attack: str) -> str:
    """A real migrate-dst as the stranger: its certificate from another CA (it retries), or the wrong
    transport.  It must be turned away with one line of its own, within its --connect-timeout."""
    tls = {"tls-wrong-ca": ctx.env.other.args("dst", ca=ctx.env.pki.dir / "ca.pem"), "plaintext-vs-tls": [],
           "tls-vs-plaintext": ctx.env.pki.args("dst")}[attack]
    argv = [str(BIN / "migrate-dst"), "--connect", f"{ctx.host}:{ctx.port}", *DST_OPTS, *tls,
            *(["--key-file", str(ctx.env.key_file)] if ctx.ns is not None else [])]
    if ctx.ns is not None:
        argv = ctx.ns.exec_b(argv)
    proc = None
    with trio.move_on_after(CONNECT_S + MARGIN_S + 2):
        proc = await trio.run_process(argv, capture_stderr=True, check=False)
    if proc is None:
        raise _StrangerFailed(f"the stranger migrate-dst ({attack}) still ran {CONNECT_S + MARGIN_S + 2:g} s later "
                              f"(--connect-timeout {CONNECT_S:g})")
    err = proc.stderr.decode(errors="replace")
    if tb := traceback_of(err):
        raise _StrangerFailed(f"traceback in the stranger migrate-dst: {tb}")
    if proc.returncode == 0:
        raise _StrangerFailed("a stranger migrate-dst got in and migrated")
    if why := one_line(err, "migrate-dst"):
        raise _StrangerFailed(f"the stranger migrate-dst was turned away with {why}")
    return error_line(err, "migrate-dst")


async def run_strangers(cases: list[Case], env: Env) -> list[Result]:
    """Strangers against one source: each in turn (the source must survive it, not spin, and hold nothing
    open past --handshake-timeout), then a legitimate destination whose slowed stream all of them attack
    again at once; it must verify.  After a case that fails, a fresh source takes the rest; a group whose
    second phase fails is run again one case at a time, to name the culprit."""
    transport, vanish = cases[0].transport, cases[0].attack == "vanish"
    results: dict[Case, Result] = {}
    pending = list(cases)
    tmp = env.unit_dir(f"strangers-{transport}-{cases[0].state.name}-{'vanish' if vanish else 'all'}-{len(cases)}")
    async with (Netns(env.tag()) if vanish else contextlib.nullcontext()) as ns:
        host = HOST_A if ns is not None else "127.0.0.1"
        attempt = 0
        while pending:
            attempt += 1
            sub = tmp / f"source-{attempt}"
            sub.mkdir()
            # The stream is slowed down to outlast the strangers' second round (3-4 s), and the guest to a
            # few faults a second at the destination: a fault's page is never slowed down.
            rate = int(STRANGER_GUEST_MIB * 2**20 / (6.0 if len(pending) > 1 else 5.0))
            src = await Honest.start("migrate-src", source_args(
                env, sub, host, transport, ns, Mode.postcopy, 0, STRANGER_GUEST_MIB * 256,
                ["--zero-fraction", "0", "--max-bandwidth", str(rate), "--rate", str(STRANGER_RATE)]), sub, "src", ns)
            survivors: list[tuple[Case, str, float]] = []
            tainted = False
            async with trio.open_nursery() as n:
                n.start_soon(src.sample)
                try:
                    port = await src.ready_port()
                except (RuntimeError, trio.TooSlowError) as exc:
                    for case in pending:
                        results[case] = Result(case, FAILED, None, [f"migrate-src did not start: {exc}"])
                    pending = []
                    n.cancel_scope.cancel()
                    break
                ctx = Stranger(env, host, port, transport, ns)
                for case in list(pending):
                    pending.remove(case)
                    reasons, note, took = await _one_stranger(ctx, case, src)
                    if reasons:
                        results[case] = Result(case, FAILED, took, reasons, note)
                        tainted = True
                        break  # a fresh source for the rest
                    survivors.append((case, note, took))
                if not tainted:
                    await _legit_with_strangers(env, sub, ctx, src, survivors, results, ns)
                n.cancel_scope.cancel()
            await src.stop()
            unresolved = [case for case, _, _ in survivors if case not in results]
            if tainted:
                pending = unresolved + pending  # they passed on a source that then failed: again, on a fresh one
            else:
                for case in unresolved:  # the second phase failed as a group: one at a time
                    results.update({r.case: r for r in await run_strangers([case], env)})
    return [results[c] for c in cases]


async def _one_stranger(ctx: Stranger, case: Case, src: Honest) -> tuple[list[str], str, float]:
    """One stranger against a source nobody else uses now: (why it failed, a note, how long it took)."""
    t0, seen = trio.current_time(), len(src.err())
    reasons: list[str] = []
    note = ""
    try:
        with trio.fail_after(HANDSHAKE_S + MARGIN_S + CONNECT_S + 5):
            note = await stranger(ctx, case)
    except _StrangerFailed as exc:
        reasons.append(str(exc))
    except (OSError, _LinkLost, trio.TooSlowError) as exc:
        if src.running:
            reasons.append(f"the stranger could not do its part: {type(exc).__name__}: {exc}")
    took = trio.current_time() - t0
    await trio.sleep(max(0.3, SPIN_WINDOW_S + 0.3 - took))  # a whole window of CPU time after its start
    new = src.err()[seen:]
    if tb := traceback_of(new):
        reasons.append(f"traceback in migrate-src: {tb}")
    if not src.running:
        reasons.append(f"migrate-src died (exit {src.rc})" + ("" if traceback_of(src.err()) else
                                                                f": {last_line(src.err())}"))
    elif spin := src.spin(t0):
        reasons.append(spin)
    return reasons, note, took


async def _legit_with_strangers(env: Env, tmp: Path, ctx: Stranger, src: Honest,
                                survivors: list[tuple[Case, str, float]], results: dict[Case, Result],
                                ns: Netns | None) -> None:
    """Phase two: a legitimate destination gets in after the strangers; while its stream runs (slowed
    down), every stranger attacks again at once; it must verify and the source end with exit 0."""
    if any(c.attack in ("open-twice", "storm", "vanish") for c, _, _ in survivors):
        await trio.sleep(HANDSHAKE_S + 1.5)  # a stranger's half-opened session is dropped by then
    legit: list[Legit] = []
    during: dict[Case, str] = {}
    t0 = trio.current_time()

    async def destination() -> None:
        legit.append(await run_legit(env, tmp, ctx.host, ctx.port, ctx.transport, ns))

    finished: dict[Case, float] = {}
    turned_away: set[Case] = set()

    async def again(case: Case) -> None:
        try:
            with trio.fail_after(HANDSHAKE_S + MARGIN_S + CONNECT_S + 5):
                await stranger(ctx, case)
            finished[case] = trio.current_time()
        except _StrangerFailed as exc:
            during[case] = f"during a migration: {exc}"
        except (OSError, _LinkLost, trio.TooSlowError):
            # All strangers at once exceed --max-pending: the source closes the ones beyond at once, by design.
            finished[case] = trio.current_time()
            turned_away.add(case)

    async with trio.open_nursery() as n:
        n.start_soon(destination)
        if ns is None:  # a vanishing stranger takes the link down for everyone on it: not during a migration
            with trio.move_on_after(15):
                while "switchover:" not in src.err() and not legit:
                    await trio.sleep(0.05)
            async with trio.open_nursery() as attackers:
                for case, _, _ in survivors:
                    attackers.start_soon(again, case)
    ended = await src.wait(trio.current_time() + LINK_S + MARGIN_S)
    err = src.err()
    group: list[str] = []
    if legit and legit[0].failure:
        group.append(legit[0].failure)
    if tb := traceback_of(err):
        group.append(f"traceback in migrate-src: {tb}")
    if not ended:
        group.append("migrate-src still running after its destination ended")
    elif src.rc != 0:
        group.append(f"migrate-src exited {src.rc}: {error_line(err, 'migrate-src')}")
    if spin := src.spin(t0):
        group.append(spin)
    if group and len(survivors) > 1:
        return  # not attributed: the caller runs each case alone
    late = legit[0].ended_at if legit and legit[0].ended_at is not None else None
    for case, note, took in survivors:
        reasons = group + ([during[case]] if case in during else [])
        if late is not None and case in finished and finished[case] > late and ns is None:
            note = (note + "; " if note else "") + "its second round outlasted the migration"
        if case in turned_away:
            note = (note + "; " if note else "") + "its second round was turned away at once (--max-pending)"
        results[case] = Result(case, FAILED if reasons else VERIFIED, took, reasons,
                               note or "the source served a legitimate destination afterwards")


# == running everything ==================================================================================
def unit_limit(unit: list[Case]) -> float:
    """The most a unit may take, its cases' bounds and set-up included (a stranger may be run twice more)."""
    return max(bound(c)[0] for c in unit) + REACH_S + 30 + (3 * 15 * len(unit) if unit[0].stranger else 0)


async def run_unit(unit: list[Case], env: Env) -> list[Result]:
    """One stranger group, or one session case; a bug of the suite itself is a failure of its cases."""
    limit = unit_limit(unit)
    try:
        with trio.fail_after(limit):
            if unit[0].stranger:
                return await run_strangers(unit, env)
            return [await (run_src_case if unit[0].role == "src" else run_dst_case)(unit[0], env)]
    except trio.TooSlowError:
        return [Result(c, FAILED, None, [f"the case did not finish within {limit:g} s (the suite's own limit)"])
                for c in unit]
    except Exception as exc:  # noqa: BLE001 - a suite bug: reported per case, the run goes on
        (env.root / "suite-errors.txt").open("a").write("".join(traceback.format_exception(exc)) + "\n")
        return [Result(c, FAILED, None, [f"attack suite error: {type(exc).__name__}: {exc}"]) for c in unit]


def units_of(cases: list[Case]) -> list[list[Case]]:
    """Strangers in groups sharing a source (per transport; vanishing ones apart), every other case alone."""
    groups: dict[tuple, list[Case]] = defaultdict(list)
    units: list[list[Case]] = []
    for c in cases:
        if c.stranger:
            groups[(c.transport, c.attack == "vanish", c.state)].append(c)
        else:
            units.append([c])
    return list(groups.values()) + units


async def run_all(cases: list[Case], env: Env, jobs: int, say: Callable[[str], object] = print) -> list[Result]:
    limiter = trio.CapacityLimiter(jobs)
    results: list[Result] = []

    async def one(unit: list[Case]) -> None:
        async with limiter:
            for r in await run_unit(unit, env):
                results.append(r)
                say(r.line())

    async with trio.open_nursery() as n:
        for unit in units_of(cases):
            n.start_soon(one, unit)
    return sorted(results, key=lambda r: sort_key(r.case))


def _generalize(reason: str) -> str:
    """A reason with its numbers blanked, so that the same failure in many cases groups."""
    return re.sub(r"\d+(\.\d+)?", "N", reason)


def not_run(skipped: list[tuple[Case, str]]) -> str:
    """What is not run and why, one line per role, state and reason."""
    out = [f"not run ({len(skipped)} combinations of state x channel x attack x transport x mode):"]
    by: dict[tuple[str, State, str], set[str]] = defaultdict(set)
    for case, why in skipped:
        by[(case.role, case.state, why)].add(case.attack)
    for (role, state, why), attacks in sorted(by.items(), key=lambda kv: (kv[0][0] != "src",
                                                                          list(State).index(kv[0][1]), kv[0][2])):
        names = "every attack" if len(attacks) == len(ATTACKS) else ", ".join(a for a in ATTACKS if a in attacks)
        out.append(f"  {role} {state.name:15} {names}: {why}")
    return "\n".join(out)


def table(results: list[Result], skipped: list[tuple[Case, str]], elapsed: float) -> str:
    head = f"{'role':4}{'state':15}{'channel':9}{'attack':46}{'tls':6}{'mode':9}{'time':7}  outcome"
    out = [head, "-" * len(head)] + [r.line() for r in results]
    if skipped:
        out += ["", not_run(skipped)]
    counts = Counter(r.outcome for r in results)
    out += ["", f"{len(results)} cases in {elapsed / 60:.1f} min: " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in (VERIFIED, ONE_LINE, FAILED))]
    failures: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        for reason in r.reasons:
            failures[_generalize(reason)].append(r)
    if failures:
        out.append("failures, by reason:")
        for reason, rs in sorted(failures.items(), key=lambda kv: -len(kv[1])):
            out.append(f"  {len(rs):4} x {reason}")
            out += [f"         {r.case.name}" for r in rs[:3]]
            if len(rs) > 3:
                out.append(f"         ... and {len(rs) - 3} more")
    return "\n".join(out)


def select_cases(full: bool, patterns: list[str]) -> tuple[list[Case], list[tuple[Case, str]]]:
    cases, skipped = generate(full)
    if not full:
        cases = quick(cases)
    if patterns:
        def match(name: str) -> bool:
            return any(fnmatch.fnmatch(name, pat) if any(ch in pat for ch in "*?[") else pat in name
                       for pat in patterns)
        cases = [c for c in cases if match(c.name)]
        skipped = [(c, why) for c, why in skipped if match(c.name)]
    return cases, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attack", description="Hostile peers generated from the protocol's order "
                                 "table against real migrate-src and migrate-dst processes; exits 1 if any case "
                                 "failed.")
    ap.add_argument("--quick", action="store_true", help="a few minutes' subset (tests/test_attack.py runs it)")
    ap.add_argument("-k", dest="patterns", action="append", default=[], metavar="PATTERN",
                    help="only cases whose name contains PATTERN (or matches it, with * ? [ ]); "
                         "names read role/STATE/channel/attack/transport/mode; repeat for more")
    ap.add_argument("--jobs", type=int, default=2, metavar="N", help="cases run at once (default 2)")
    ap.add_argument("--list", action="store_true", help="list the cases and what is not run, run nothing")
    ap.add_argument("--workdir", type=Path, default=None, help="where to keep each case's stderr and metrics "
                    "(default: a directory in /tmp, removed when every case passed)")
    args = ap.parse_args(argv)
    cases, skipped = select_cases(not args.quick, args.patterns)
    if args.list:
        for c in cases:
            print(c.name)
        print(not_run(skipped))
        print(f"{len(cases)} cases, {len(skipped)} combinations not run")
        return 0
    if os.geteuid() != 0 and any(c.attack == "vanish" for c in cases):
        print("attack: 'vanish' needs root (network namespaces); run as root or add -k with a pattern that "
              "leaves it out", file=sys.stderr)
        return 2
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="uffd-attack-", dir=args.workdir))
    print(f"attack: {len(cases)} cases ({'full' if not args.quick else 'quick'}), {args.jobs} at a time; "
          f"their files in {root}", flush=True)
    t0 = time.monotonic()

    async def go() -> list[Result]:
        env = Env.make(root)
        return await run_all(cases, env, args.jobs, lambda line: print(line, flush=True))

    results = trio.run(go)
    print()
    print(table(results, skipped if not args.quick else [], time.monotonic() - t0))
    bad = [r for r in results if r.failed]
    if not bad and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"attack: {len(results)} cases, {len(bad)} failed" + (f" (files in {root})" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
