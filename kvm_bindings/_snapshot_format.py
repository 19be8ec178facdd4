"""The snapshot format's writer and reader (the format is described in
kvm_bindings.snapshot): blobs laid out and checksummed, and every byte checked before a
VmState is built from them."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from typing import IO, Any

from ._layout import capacity
from .errors import SnapshotError
from .snapshot import (
    _ALIGN,
    _HEADER,
    FORMAT_VERSION,
    MAGIC,
    MemorySlotState,
    VcpuState,
    VmState,
    apply_increment,
    file_identity,
    layout_hash,
)


def _arch_abi(arch: object, prefix: str) -> Any:
    """The generated ABI module a snapshot's arch names, or SnapshotError."""
    from . import abi
    if arch not in abi.ARCHES:
        raise SnapshotError(f"{prefix}it is for arch {arch!r}; this library knows "
                            f"{', '.join(abi.ARCHES)}")
    return import_module(f"{abi.__name__}.{arch}")


# ---- writing ------------------------------------------------------------------------------

def _aligned(n: int, align: int = _ALIGN) -> int:
    return (n + align - 1) // align * align


def _cdata_bytes(obj: Any) -> memoryview:
    """The bytes a struct's blob holds: the whole object, trailing entries included, or
    for one made over a larger buffer (kvm_nested_state), all of that buffer from it."""
    if not isinstance(obj, (ctypes.Structure, ctypes.Union)):
        raise SnapshotError(f"a snapshot holds ABI structs, not {type(obj).__name__}")
    nbytes = getattr(obj, "flex_nbytes", None) or capacity(obj)
    return memoryview((ctypes.c_uint8 * nbytes).from_address(ctypes.addressof(obj))).cast("B")


class Writer:
    """Lays the blobs out, then writes header, metadata and payload in one pass."""

    def __init__(self, state: VmState, memory: bool, memory_out: IO[bytes] | None,
                 memory_name: str | None) -> None:
        self.state = state
        self.memory = memory
        self.memory_out = memory_out
        self.memory_name = memory_name
        self.blobs: list[memoryview] = []          # payload, in order
        self.memory_blobs: list[memoryview] = []   # the separate memory file, in order
        self.size = 0
        self.memory_size = 0
        self.layouts: dict[str, str] = {}
        self.abi = _arch_abi(state.arch, "this state cannot be written: ")
        if any(type(v.id) is not int for v in state.vcpus) or not isinstance(state.id, str):
            raise SnapshotError("vCPU ids must be numbers and the snapshot id a string")
        if not isinstance(state.registrations, dict) or not all(
                isinstance(v, list) for v in state.registrations.values()):
            raise SnapshotError("registrations must map each kind to a list")

    def _place(self, data: memoryview, ref: dict[str, Any], memory: bool = False,
               to_memory_file: bool = False) -> None:
        """Memory goes at page boundaries (so that it can be mapped), structs at 64 bytes."""
        ref["size"] = data.nbytes
        ref["sha256"] = hashlib.sha256(data).hexdigest()
        if to_memory_file:
            ref["offset"] = self.memory_size
            ref["file"] = "memory"
            self.memory_blobs.append(data)
            self.memory_size = _aligned(self.memory_size + data.nbytes)
        else:
            if memory:
                self._pad_to(_aligned(self.size))
            ref["offset"] = self.size
            self.blobs.append(data)
            self.size += data.nbytes
            self._pad_to(_aligned(self.size, 64))

    def _pad_to(self, end: int) -> None:
        if end > self.size:
            self.blobs.append(memoryview(bytes(end - self.size)))
            self.size = end

    def _struct(self, obj: Any) -> dict[str, Any]:
        ctype = type(obj)
        name = ctype.__name__
        if getattr(self.abi, name, None) is not ctype:
            raise SnapshotError(f"a {ctype.__module__}.{name} is not one of the "
                                f"{self.state.arch} ABI's structs this snapshot can hold")
        if name not in self.layouts:
            self.layouts[name] = layout_hash(ctype)
        ref: dict[str, Any] = {"type": name}
        if hasattr(obj, "flex_capacity"):
            ref["entries"] = obj.flex_capacity
        data = _cdata_bytes(obj)
        if "entries" not in ref and data.nbytes != ctypes.sizeof(ctype):
            ref["nbytes"] = data.nbytes
        self._place(data, ref)
        return ref

    def _structs(self, structs: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._struct(obj) for name, obj in structs.items()}

    def _slot(self, m: MemorySlotState) -> dict[str, Any]:
        if m.data is not None and memoryview(m.data).nbytes != m.size:
            raise SnapshotError(f"slot {m.slot} holds {memoryview(m.data).nbytes} bytes, not "
                                f"its size {m.size}")
        out: dict[str, Any] = {"slot": m.slot, "guest_phys_addr": m.guest_phys_addr,
                               "size": m.size, "flags": m.flags, "data": None, "pages": None}
        separate = self.memory_out is not None
        if self.memory and m.data is not None:
            out["data"] = {}
            self._place(memoryview(m.data).cast("B"), out["data"], True, separate)
        if self.memory and m.pages is not None:
            out["pages"] = []
            for offset, data in m.pages:
                ref: dict[str, Any] = {"at": offset}
                self._place(memoryview(data).cast("B"), ref, True, separate)
                out["pages"].append(ref)
        return out

    def write(self, out: IO[bytes]) -> None:
        for piece in self.pieces():
            out.write(piece)
        if self.memory_out is not None:
            _write_blobs(self.memory_out, self.memory_blobs, align=True)

    def pieces(self) -> list[bytes | memoryview]:
        """The snapshot's bytes, in pieces: header, metadata, padding, blobs."""
        s = self.state
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION, "id": s.id, "base": s.base, "arch": s.arch, "host": s.host,
            "vm": {"structs": self._structs(s.structs), "values": s.values},
            "vcpus": [{"id": v.id, "structs": self._structs(v.structs), "values": v.values}
                      for v in s.vcpus],
            "memory": [self._slot(m) for m in s.memory],
            "memory_file": self.memory_name,
            "registrations": s.registrations,
        }
        meta["layouts"] = dict(sorted(self.layouts.items()))
        # One hash over all of them, to compare snapshots (and libraries) at a glance.
        meta["layout_hash"] = hashlib.sha256(
            json.dumps(meta["layouts"], sort_keys=True).encode()).hexdigest()[:32]
        try:
            text = json.dumps(meta, separators=(",", ":"), sort_keys=True,
                              allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"this state holds a value a snapshot cannot: {e}") from None
        return [_HEADER.pack(MAGIC, FORMAT_VERSION, _HEADER.size, len(text), self.size,
                             hashlib.sha256(text).digest()),
                text, bytes(_aligned(_HEADER.size + len(text)) - _HEADER.size - len(text)),
                *self.blobs]


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A new file that takes path's name once it is whole (rename), or is removed."""
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)),
                               prefix=f".{os.path.basename(target)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_blobs(out: IO[bytes], blobs: Iterable[memoryview], align: bool = False) -> None:
    for data in blobs:
        out.write(data)
        pad = _aligned(data.nbytes) - data.nbytes if align else 0
        if pad:
            out.write(bytes(pad))


# ---- reading ------------------------------------------------------------------------------

def _open_regular(path: str | os.PathLike[str], what: str) -> int:
    """An fd of a regular file (not a FIFO that would block, not a device), or SnapshotError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, TypeError, ValueError) as e:
        raise SnapshotError(f"cannot open the {what} file {path!r}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(f"the {what} file {path!r} is not a regular file")
    return fd


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    fd = _open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise SnapshotError(f"cannot read the {what} file {path!r}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not data:
        raise SnapshotError(f"{os.fspath(path)} is empty, not a {what} file")
    return data


def _map_file(path: str | os.PathLike[str]) -> tuple[mmap.mmap | bytes, tuple[int, int, int, int]]:
    fd = _open_regular(path, "memory")
    try:
        size = os.fstat(fd).st_size
        mapping = (mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
                   if size else b"")
        return mapping, file_identity(fd)
    finally:
        os.close(fd)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f"not a usable snapshot: its {what} is not a string")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a snapshot holds")


class Reader:
    """Checks everything before it builds anything: a VmState comes back whole or not at all."""

    def __init__(self, data: memoryview, memory_path: str | os.PathLike[str] | None,
                 map_memory: bool = False) -> None:
        self.data = data
        self.memory_path = memory_path
        self.map_memory = map_memory
        self.memory_view: memoryview | None = None
        self.memory_file_path = ""
        self.memory_file_id: tuple[int, int, int, int] | None = None
        self.meta_memory_file: Any = None
        self.layouts: dict[str, Any] = {}
        self.abi: Any = None

    def fail(self, what: str) -> SnapshotError:
        return SnapshotError(f"not a usable snapshot: {what}")

    def header(self) -> tuple[dict[str, Any], memoryview]:
        data = self.data
        if data.nbytes < _HEADER.size:
            raise self.fail(f"{data.nbytes} bytes is shorter than the {_HEADER.size}-byte header")
        magic, version, header_size, meta_len, payload_len, digest = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise self.fail(f"it starts with {bytes(magic)!r}, not the snapshot magic {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise self.fail(f"format version {version}; this library reads version "
                            f"{FORMAT_VERSION}")
        if header_size != _HEADER.size:
            raise self.fail(f"header size {header_size}, expected {_HEADER.size}")
        start = _aligned(_HEADER.size + meta_len)
        if data.nbytes < start + payload_len:
            raise self.fail(f"truncated: {data.nbytes} bytes, but its header promises "
                            f"{start + payload_len}")
        text = data[_HEADER.size:_HEADER.size + meta_len]
        if hashlib.sha256(text).digest() != digest:
            raise self.fail("its metadata does not match its checksum (corrupted)")
        try:
            meta = json.loads(bytes(text), parse_constant=_no_constant)
        except ValueError as e:
            raise self.fail(f"its metadata is not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise self.fail("its metadata is not a JSON object")
        return meta, data[start:start + payload_len]

    def check_host(self, meta: dict[str, Any]) -> None:
        arch = meta.get("arch")
        self.abi = _arch_abi(arch, "not a usable snapshot: ")
        layouts = meta.get("layouts")
        if not isinstance(layouts, dict):
            raise self.fail("its metadata has no layouts")
        differ = []
        for name, digest in layouts.items():
            ctype = getattr(self.abi, str(name), None)
            if not isinstance(ctype, type) or not issubclass(ctype, (ctypes.Structure, ctypes.Union)):
                differ.append(f"{name} (unknown to this library)")
            elif layout_hash(ctype) != digest:
                differ.append(f"{name} (this library's {name} is laid out differently)")
        if differ:
            raise SnapshotError(f"the snapshot was written with other ABI layouts than this "
                                f"library's {arch} ones: {'; '.join(differ)}; restore it with "
                                f"the kvm-bindings version that wrote it "
                                f"({meta.get('host', {}).get('library', '?')})")

    def blob(self, payload: memoryview, ref: Any, where: str) -> memoryview:
        if not isinstance(ref, dict):
            raise self.fail(f"{where}: a blob reference must be an object")
        try:
            offset, size, digest = int(ref["offset"]), int(ref["size"]), str(ref["sha256"])
        except (KeyError, TypeError, ValueError):
            raise self.fail(f"{where}: a blob reference needs offset, size and sha256") from None
        source = payload
        if ref.get("file") == "memory":
            source = self.memory_file(where)
        if offset < 0 or size < 0 or offset + size > source.nbytes:
            raise self.fail(f"{where}: its blob ({size} bytes at {offset}) runs past the end "
                            f"of the data ({source.nbytes} bytes): truncated?")
        view = source[offset:offset + size]
        if hashlib.sha256(view).hexdigest() != digest:
            raise self.fail(f"{where}: its bytes do not match their checksum (corrupted)")
        return view

    def memory_file(self, where: str) -> memoryview:
        if self.memory_view is None:
            path = self.memory_path
            if path is None:
                path = self.meta_memory_file
                # A path from the metadata, never anything else: an int would be taken by
                # open() as a descriptor of this process.
                if not isinstance(path, str) or not path:
                    raise self.fail(f"{where} is in a separate memory file, but none is "
                                    f"named; pass memory_path=")
            if self.map_memory:
                mapping, self.memory_file_id = _map_file(path)
                self.memory_view = memoryview(mapping)
            else:
                self.memory_view = memoryview(read_file(path, "memory"))
            self.memory_file_path = os.path.abspath(path)
        return self.memory_view

    def struct(self, payload: memoryview, ref: Any, where: str) -> Any:
        view = self.blob(payload, ref, where)
        ctype = getattr(self.abi, str(ref.get("type")), None)
        if ctype is None or str(ref.get("type")) not in self.layouts:
            raise self.fail(f"{where}: type {ref.get('type')!r} is not among its layouts")
        entries = ref.get("entries")
        if entries is not None:
            if (type(entries) is not int or entries < 0 or entries > 1 << 20
                    or not hasattr(ctype, "_flex_field_")):
                raise self.fail(f"{where}: {entries!r} entries of a {ctype.__name__}")
            offset = getattr(ctype, ctype._flex_field_).offset
            nbytes = max(ctypes.sizeof(ctype), offset + entries * ctypes.sizeof(ctype._flex_type_))
            if view.nbytes != nbytes:
                raise self.fail(f"{where}: {view.nbytes} bytes for a {ctype.__name__} with "
                                f"{entries} entries ({nbytes} bytes)")
            obj = ctype.alloc(entries)
            ctypes.memmove(ctypes.addressof(obj), bytes(view), view.nbytes)
            return obj
        if "nbytes" in ref:
            # A struct the kernel sizes itself (kvm_nested_state: its size member says how
            # much follows the header), kept with everything the kernel wrote.
            if view.nbytes < ctypes.sizeof(ctype) or view.nbytes > 1 << 24 or \
                    ref["nbytes"] != view.nbytes:
                raise self.fail(f"{where}: {view.nbytes} bytes for a {ctype.__name__}")
            buf = (ctypes.c_uint8 * view.nbytes).from_buffer_copy(view)
            return ctype.from_buffer(buf)
        if view.nbytes != ctypes.sizeof(ctype):
            raise self.fail(f"{where}: {view.nbytes} bytes for a {ctype.__name__} "
                            f"({ctypes.sizeof(ctype)} bytes)")
        return ctype.from_buffer_copy(view)

    def structs(self, payload: memoryview, refs: Any, where: str) -> dict[str, Any]:
        if not isinstance(refs, dict):
            raise self.fail(f"{where}: structs must be an object")
        return {str(k): self.struct(payload, ref, f"{where}.{k}") for k, ref in refs.items()}

    def slot(self, payload: memoryview, m: Any, i: int) -> MemorySlotState:
        where = f"memory[{i}]"
        try:
            slot = MemorySlotState(int(m["slot"]), int(m["guest_phys_addr"]), int(m["size"]),
                                   int(m["flags"]))
        except (KeyError, TypeError, ValueError):
            raise self.fail(f"{where}: a slot needs slot, guest_phys_addr, size and flags") from None
        if m.get("data") is not None:
            slot.data = self.blob(payload, m["data"], where)
            if slot.data.nbytes != slot.size:
                raise self.fail(f"{where}: {slot.data.nbytes} bytes of contents for a slot of "
                                f"{slot.size}")
            if m["data"].get("file") == "memory" and self.map_memory:
                slot.source = (self.memory_file_path, int(m["data"]["offset"]))
                slot.source_id = self.memory_file_id
        if m.get("pages") is not None:
            slot.pages = []
            for j, ref in enumerate(m["pages"]):
                view = self.blob(payload, ref, f"{where}.pages[{j}]")
                at = ref.get("at")
                if not isinstance(at, int) or at < 0 or at + view.nbytes > slot.size:
                    raise self.fail(f"{where}.pages[{j}]: pages at {at!r} fall outside the slot")
                slot.pages.append((at, view))
        return slot

    def state(self, base: VmState | None) -> VmState:
        try:
            state = self._state()
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                IndexError) as e:
            raise self.fail(f"its metadata lacks or misspells {e!r}") from None
        if state.base is None:
            if base is not None:
                raise SnapshotError("base= is for incremental snapshots; this one is full")
            return state
        return apply_increment(base, state)

    def _state(self) -> VmState:
        meta, payload = self.header()
        self.check_host(meta)
        self.layouts = meta["layouts"]
        self.meta_memory_file = meta.get("memory_file")
        ids = [v["id"] for v in meta["vcpus"]]
        if not all(type(i) is int and i >= 0 for i in ids) or len(set(ids)) != len(ids):
            raise self.fail(f"vCPU ids {ids!r} are not distinct numbers")
        if meta["base"] is not None and not isinstance(meta["base"], str):
            raise self.fail("its base is not a snapshot id")
        for name in ("host", "registrations"):
            if not isinstance(meta[name], dict):
                raise self.fail(f"its {name} is not an object")
        vm = meta["vm"]
        state = VmState(
            arch=str(meta["arch"]), host=dict(meta["host"]),
            structs=self.structs(payload, vm["structs"], "vm"), values=dict(vm["values"]),
            vcpus=tuple(VcpuState(int(v["id"]), self.structs(payload, v["structs"],
                                                             f"vcpu {v['id']}"),
                                  dict(v["values"])) for v in meta["vcpus"]),
            memory=tuple(self.slot(payload, m, i) for i, m in enumerate(meta["memory"])),
            registrations={str(k): list(v) for k, v in dict(meta["registrations"]).items()},
            id=_text(meta["id"], "id"), base=meta["base"])
        return state


