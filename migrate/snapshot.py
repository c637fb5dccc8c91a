"""Snapshots: a stopped guest's memory image and CPU state in a directory, as a VMM saves one.

A snapshot directory holds two files:

- ``memory``: the guest's raw memory, ``spec.size`` bytes, byte for byte as the guest has it (as
  Firecracker's snapshot memory file is): what a page-fault handler serves a restored guest from,
  each region's ``offset`` indexing into it;
- ``state.json``: ``{"format": 1, "pages", "vcpus", "workload", "seed", "zero_permille", "rate",
  "memory", "cpu": [[prng, steps, acc], ...]}``, the ``GuestSpec`` (``pages`` in 4 KiB pages, the
  workload and the memory kind by name) and each vCPU's state.

The memory is written by C (``guest_save``) in a worker thread: guest memory is never read by a
thread that holds the GIL.  ``state.json`` is written last, so a directory whose save was cut short
has none and does not load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ._native import lib
from .errors import UsageError
from .guest import Guest, GuestSpec, Workload
from .memory import Memory

FORMAT = 1
MEMORY = "memory"
STATE = "state.json"
# state.json is a few dozen bytes per vCPU: anything far larger is not ours.
_MAX_STATE_BYTES = 1 << 20

CpuState = tuple[int, int, int]  # (prng, steps, acc), as Guest.export_state gives it


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory's guest and CPU state (the memory stays in ``memory_path``)."""

    directory: Path
    spec: GuestSpec
    cpu: tuple[CpuState, ...]

    @property
    def memory_path(self) -> Path:
        return self.directory / MEMORY

    def steps(self) -> list[int]:
        """Each vCPU's steps when the snapshot was taken: where a replay of it stops."""
        return [steps for _, steps, _ in self.cpu]


async def save(directory: str | os.PathLike[str], guest: Guest) -> Snapshot:
    """Saves a stopped guest's memory and CPU state in ``directory`` (made if missing).

    Raises:
        UsageError: the directory or its files cannot be written (the hint says what to check).
        RuntimeError: the vCPUs still run.
    """
    if guest.running():
        raise RuntimeError("stop the vCPUs before saving a snapshot")
    snap = Snapshot(Path(directory), guest.spec, tuple(guest.export_state()))
    try:
        snap.directory.mkdir(parents=True, exist_ok=True)
        (snap.directory / STATE).unlink(missing_ok=True)  # a half-written snapshot must not load
        fd = os.open(snap.memory_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write a snapshot in {directory}: {exc.strerror}",
                         hint="give a directory you may write to") from None
    try:
        rc = await trio.to_thread.run_sync(lib.guest_save, guest.base, guest.spec.size, fd)
    finally:
        os.close(fd)
    if rc < 0:
        raise UsageError(f"cannot write {snap.memory_path}: {os.strerror(-rc)}",
                         hint="check the free space of the snapshot's file system")
    state = _state_json(snap)
    try:
        (snap.directory / STATE).write_text(json.dumps(state) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {snap.directory / STATE}: {exc.strerror}",
                         hint="check the free space of the snapshot's file system") from None
    return snap


def _state_json(snap: Snapshot) -> dict[str, Any]:
    s = snap.spec
    return {"format": FORMAT, "pages": s.pages, "vcpus": s.vcpus, "workload": s.workload.name, "seed": s.seed,
            "zero_permille": s.zero_permille, "rate": s.rate, "memory": s.memory.name,
            "cpu": [list(c) for c in snap.cpu]}


def load_state(directory: str | os.PathLike[str]) -> Snapshot:
    """The snapshot in ``directory`` from its ``state.json`` alone (a VMM restoring it gets the memory from its
    page-fault handler, not from the file).

    Raises:
        UsageError: ``state.json`` is missing, does not parse or does not describe a guest; one line
            naming the file and what is wrong.
    """
    path = Path(directory) / STATE
    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_STATE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}",
                         hint="give a directory that migrate-snapshot wrote") from None
    try:
        if len(text) > _MAX_STATE_BYTES:
            raise ValueError(f"more than {_MAX_STATE_BYTES >> 20} MiB")
        state = json.loads(text)
        return Snapshot(Path(directory), _spec(state), _cpu(state))
    except (ValueError, UsageError) as exc:  # json's errors are ValueErrors too
        raise UsageError(f"{path} is not a snapshot's state: {exc}",
                         hint="give a directory that migrate-snapshot wrote") from None


def load(directory: str | os.PathLike[str]) -> Snapshot:
    """The snapshot in ``directory``, its ``state.json`` and the size of its ``memory`` file checked.

    Raises:
        UsageError: as ``load_state``, or the memory file is missing or not the guest's size.
    """
    snap = load_state(directory)
    try:
        size = snap.memory_path.stat().st_size
    except OSError as exc:
        raise UsageError(f"cannot read {snap.memory_path}: {exc.strerror}",
                         hint="give a directory that migrate-snapshot wrote") from None
    if size != snap.spec.size:
        raise UsageError(f"{snap.memory_path} holds {size} bytes; {snap.directory / STATE} describes a guest of "
                         f"{snap.spec.size}", hint="the two files come from different snapshots, or the memory "
                                                   "file was cut short")
    return snap


def _field(state: dict[str, Any], name: str, kind: type) -> Any:
    if name not in state:
        raise ValueError(f'no "{name}"')
    value = state[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f'"{name}" is not {"a whole number" if kind is int else "a string"}')
    return value


def _spec(state: Any) -> GuestSpec:
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    if state.get("format") != FORMAT:
        raise ValueError(f'"format" is {state.get("format")!r}, not {FORMAT}')
    workload, memory = _field(state, "workload", str), _field(state, "memory", str)
    if workload not in Workload.__members__:
        raise ValueError(f'"workload" {workload!r} is none of {", ".join(Workload.__members__)}')
    if memory not in Memory.__members__:
        raise ValueError(f'"memory" {memory!r} is none of {", ".join(Memory.__members__)}')
    # GuestSpec checks the ranges (a UsageError in its own words).
    return GuestSpec(pages=_field(state, "pages", int), vcpus=_field(state, "vcpus", int),
                     workload=Workload[workload], seed=_field(state, "seed", int),
                     zero_permille=_field(state, "zero_permille", int), rate=_field(state, "rate", int),
                     memory=Memory[memory])


def _cpu(state: dict[str, Any]) -> tuple[CpuState, ...]:
    cpu = state.get("cpu")
    if not isinstance(cpu, list) or len(cpu) != state["vcpus"]:
        raise ValueError(f'"cpu" is not a list of {state["vcpus"]} vCPU states')
    for i, c in enumerate(cpu):
        if (not isinstance(c, list) or len(c) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in c)):
            raise ValueError(f'"cpu"[{i}] is not [prng, steps, acc], three 64-bit whole numbers')
    return tuple((prng, steps, acc) for prng, steps, acc in cpu)


async def take(directory: str | os.PathLike[str], spec: GuestSpec, seconds: float) -> Snapshot:
    """Builds ``spec``'s guest, runs it ``seconds``, stops it and saves it in ``directory``."""
    guest = Guest(spec, fill=True)
    try:
        guest.start()
        await trio.sleep(seconds)
        await trio.to_thread.run_sync(guest.stop)
        return await save(directory, guest)
    finally:
        if guest.running():  # cancelled while the vCPUs ran (nothing here can stall them: no userfaultfd)
            guest.stop()
        guest.close()
