"""Snapshots: VmState, what vm.save_state() returns and kvm.restore_vm() takes, and its bytes.

A VmState is plain data: the kernel's own structs (ctypes instances of the generated ABI,
kept whole: kvm_regs, kvm_lapic_state, kvm_pit_state2...), a few JSON values (MSRs, the
VM's setup calls, TSC frequency), and guest memory, slot by slot. Which structs and values
an arch saves, and the order it restores them in, is the arch's business
(kvm_bindings.x86.snapshot); this module only carries them and writes them down.

The byte format (version 1), every integer little-endian:

====== ====== ==============================================================
offset size   what
====== ====== ==============================================================
0      8      magic, b"KVMSNAP\\x00"
8      4      format version (1)
12     4      header size (64)
16     8      metadata length M
24     8      payload length P
32     32     sha256 of the metadata
64     M      metadata: UTF-8 JSON (below)
...           zeros up to the next 4096-byte boundary, where the payload starts
...    P      the payload: blobs at the offsets the metadata names (memory at multiples
              of 4096 from the payload's start, structs at multiples of 64)
====== ====== ==============================================================

The metadata says who wrote the snapshot (``host``: library version, kernel release, arch,
CPU vendor and model), lists every struct type a blob holds with a hash of its layout
(``layouts``: names, offsets, sizes and types of every member, recursively, as this
library's generated classes have them; ``layout_hash`` is one hash over all of them),
and describes the state: ``vm``, ``vcpus`` and ``memory``. Every blob is named by a
reference ``{"type", "offset", "size", "sha256"}`` (``"entries"`` too for a struct with
a flexible array, ``"nbytes"`` for one the kernel sizes itself such as
``kvm_nested_state``; ``"file": "memory"`` for memory kept in a separate file). A
snapshot whose arch or layouts differ from this library's, or whose bytes are cut short
or altered, is refused with a SnapshotError naming what differs; nothing is restored
from it.

Memory can be kept out of the snapshot: ``write(path, memory_path=...)`` puts it in a
file of its own (page-aligned, so that ``read(map_memory=True)`` and a restore can map
it copy-on-write instead of copying),
and ``vm.save_state(memory=False)`` records only the slot table, for memory the caller
carries itself (a file or memfd backing). An incremental snapshot (``vm.save_state(
base=...)``) holds only the pages written since its base, found with the dirty log;
``VmState.from_bytes(data, base=...)`` puts the two together.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import SnapshotError

if TYPE_CHECKING:
    from ctypes import _CData

__all__ = ["FORMAT_VERSION", "MemorySlotState", "VcpuState", "VmState", "apply_increment",
           "file_identity", "host_facts", "iter_runs", "layout_hash"]

MAGIC = b"KVMSNAP\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ32s")
_ALIGN = 4096
_LIBRARY_VERSION = "0.1.0"


# ---- the state, as plain data -------------------------------------------------------------

@dataclass(eq=False)
class VcpuState:
    """One vCPU: its id, the kernel's structs by name (``regs``, ``sregs2``, ``lapic``...:
    each a ctypes instance of the generated ABI), and JSON values (``msrs``...)."""

    id: int
    structs: dict[str, _CData] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class MemorySlotState:
    """One memory slot: where it sits and what it holds.

    data is the slot's whole contents (a bytes-like of size bytes), or None when the
    snapshot does not carry it (memory=False, or an incremental snapshot). pages, in an
    incremental snapshot, are the runs of pages written since the base: (offset in the
    slot, bytes). source, for memory kept in a separate file: (path, offset in it).
    """

    slot: int
    guest_phys_addr: int
    size: int
    flags: int
    data: bytes | bytearray | memoryview | None = None
    pages: list[tuple[int, bytes | memoryview]] | None = None
    source: tuple[str, int] | None = None
    source_id: tuple[int, int, int, int] | None = None


@dataclass(eq=False)
class VmState:
    """A whole VM: what vm.save_state() returns and kvm.restore_vm() takes.

    arch is the ABI module's name ("x86_64"); host says where it was saved; structs and
    values are the VM-wide state (irqchip, PIT, clock; the VM type and its setup calls);
    registrations are the irqfds and ioeventfds it had, for the caller to wire up again
    (their eventfds are the caller's); vcpus are ordered by id.
    """

    arch: str
    host: dict[str, Any]
    structs: dict[str, _CData] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    vcpus: tuple[VcpuState, ...] = ()
    memory: tuple[MemorySlotState, ...] = ()
    registrations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    base: str | None = None

    @property
    def incremental(self) -> bool:
        """True for a snapshot that holds only the pages written since its base."""
        return self.base is not None

    def to_bytes(self, *, memory: bool = True) -> bytes:
        """The snapshot as bytes (see the module docstring for the format). memory=False
        leaves the memory contents out, keeping the slot table."""
        # One copy: join() sizes the result first and copies each blob into it once.
        from ._snapshot_format import Writer
        return b"".join(Writer(self, memory, None, None).pieces())

    def write(self, path: str | os.PathLike[str], *,
              memory_path: str | os.PathLike[str] | None = None) -> None:
        """Write the snapshot to path; with memory_path, the memory goes to that file
        instead, page-aligned, so that VmState.read(map_memory=True) can map it rather than
        copy it. Each file is written beside its target and renamed over it: a VM still
        mapping an older snapshot's memory file keeps the old file, never a cut one."""
        from ._snapshot_format import Writer, replacing
        with replacing(path) as f:
            if memory_path is None:
                Writer(self, True, None, None).write(f)
            else:
                with replacing(memory_path) as m:
                    Writer(self, True, m, os.path.abspath(memory_path)).write(f)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, base: VmState | None = None,
                   memory_path: str | os.PathLike[str] | None = None) -> VmState:
        """Parse a snapshot. SnapshotError for anything that is not a whole, unaltered
        snapshot of this library's format written with this library's layouts for this
        host's arch family. An incremental snapshot needs its base (a full VmState).
        Memory blobs are views of data, not copies."""
        from ._snapshot_format import Reader
        return Reader(memoryview(data).cast("B"), memory_path).state(base)

    @classmethod
    def read(cls, path: str | os.PathLike[str], *, base: VmState | None = None,
             memory_path: str | os.PathLike[str] | None = None,
             map_memory: bool = False) -> VmState:
        """VmState.from_bytes() of a file (read whole: nothing stays open or mapped).

        A snapshot written with write(memory_path=) has its memory in that file, found
        where it was written unless memory_path says where it is now. It is read in too,
        unless map_memory=True: then the VmState maps it for as long as it lives, and
        restore_vm() maps it copy-on-write and copies nothing (refusing a file changed or
        replaced since: write() replaces). The file must then stay as it is: truncating it
        kills the process with SIGBUS at the next host touch of a page gone (the
        VmState's memory, load_state(), a restored VM's memory read from the host; a
        guest touching it gets an exit instead), and what is written into it in place
        reaches the VM unchecked: the checksums were checked when read() ran.
        """
        from ._snapshot_format import Reader, read_file
        return Reader(memoryview(read_file(path, "snapshot")), memory_path,
                      map_memory).state(base)


# ---- layouts ------------------------------------------------------------------------------

def _describe(ctype: Any) -> Any:
    """A ctypes type's layout as JSON-able data: what a blob's bytes mean."""
    if issubclass(ctype, ctypes.Array):
        return ["array", ctype._length_, _describe(ctype._type_)]
    if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
        members = []
        for f in ctype._fields_:
            name, ftype = f[0], f[1]
            d = getattr(ctype, name)
            members.append([name, d.offset, d.size, _describe(ftype)])
        bits = sorted((name, v.storage, v.start, v.width, v.signed)
                      for name, v in vars(ctype).items() if type(v).__name__ == "_Bitfield")
        flex = getattr(ctype, "_flex_field_", None)
        flex_type = _describe(ctype._flex_type_) if flex else None
        kind = "union" if issubclass(ctype, ctypes.Union) else "struct"
        return [kind, ctypes.sizeof(ctype), ctypes.alignment(ctype), members, bits, flex, flex_type]
    return [getattr(ctype, "_type_", ctype.__name__), ctypes.sizeof(ctype)]


def layout_hash(ctype: type) -> str:
    """A hash of a generated type's layout: equal exactly when its blobs mean the same."""
    text = json.dumps(_describe(ctype), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def host_facts(arch: str) -> dict[str, Any]:
    """Who is writing a snapshot: the library, the kernel, the arch, the CPU (a copy)."""
    return dict(_host_facts(arch))


@functools.cache
def _host_facts(arch: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"library": _LIBRARY_VERSION, "kernel": platform.release(),
                             "arch": arch, "machine": platform.machine(),
                             "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return facts
    wanted = {"vendor_id": "cpu_vendor", "model name": "cpu_model", "cpu family": "cpu_family",
              "model": "cpu_model_number", "stepping": "cpu_stepping"}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        name = wanted.get(key.strip())
        if name is not None:
            facts[name] = value.strip()
    return facts


def file_identity(fd: int) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns): what tells a file from a changed or replaced one."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def apply_increment(base: VmState | None, inc: VmState) -> VmState:
    """The full state an incremental snapshot describes: inc's vCPU and VM state, base's
    memory with inc's pages written over it."""
    if base is None:
        raise SnapshotError(f"this snapshot is incremental: pass base=, the snapshot it was "
                            f"taken against (id {inc.base})")
    if base.id != inc.base:
        raise SnapshotError(f"this snapshot was taken against snapshot {inc.base}, not "
                            f"{base.id}")
    if base.incremental:
        raise SnapshotError("base= must be a full snapshot (apply its own base first)")
    slots = {(m.slot, m.guest_phys_addr, m.size): m for m in base.memory}
    memory = []
    for m in inc.memory:
        old = slots.get((m.slot, m.guest_phys_addr, m.size))
        if old is None or old.data is None:
            raise SnapshotError(f"slot {m.slot} at {m.guest_phys_addr:#x} is not in the base "
                                f"snapshot with its contents")
        data = bytearray(old.data)
        for at, page in m.pages or ():
            data[at:at + len(page)] = page
        memory.append(replace(m, data=data, pages=None, source=None))
    return replace(inc, memory=tuple(memory), base=None)


def iter_runs(bits: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(first, count) for each run of consecutive numbers in a sorted iterable."""
    first = last = -2
    for n in bits:
        if n != last + 1:
            if first >= 0:
                yield first, last - first + 1
            first = n
        last = n
    if first >= 0:
        yield first, last - first + 1
