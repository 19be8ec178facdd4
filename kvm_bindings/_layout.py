"""Reading generated ctypes layouts: member types and offsets, and fast unpackers.

The runtime never writes an offset down: it asks the generated classes, here,
once at import, and keeps struct.Struct unpackers for the hot paths.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

_FORMATS = {
    ctypes.c_uint8: "B", ctypes.c_int8: "b", ctypes.c_uint16: "H", ctypes.c_int16: "h",
    ctypes.c_uint32: "I", ctypes.c_int32: "i", ctypes.c_uint64: "Q", ctypes.c_int64: "q",
    ctypes.c_char: "c", ctypes.c_bool: "?",
}


def member(cls: Any, name: str) -> tuple[int, Any]:
    """(offset, ctypes type) of member `name` of cls, looking through anonymous members."""
    anonymous = getattr(cls, "_anonymous_", ())
    for entry in cls._fields_:
        if entry[0] == name:
            return int(getattr(cls, name).offset), entry[1]
    for entry in cls._fields_:
        if entry[0] in anonymous:
            try:
                off, t = member(entry[1], name)
            except KeyError:
                continue
            return int(getattr(cls, entry[0]).offset) + off, t
    raise KeyError(f"{cls.__name__} has no member {name}")


def offset_of(cls: Any, path: str) -> int:
    """Byte offset of a dotted member path, e.g. offset_of(abi.kvm_run, "io.port")."""
    total, t = 0, cls
    for part in path.split("."):
        off, t = member(t, part)
        total += off
    return total


def type_of(cls: Any, path: str) -> Any:
    t = cls
    for part in path.split("."):
        t = member(t, part)[1]
    return t


def unpacker(cls: Any, names: tuple[str, ...]) -> struct.Struct:
    """A struct.Struct reading the named scalar members of cls, in that order, from offset 0."""
    fmt, pos = "<", 0
    for off, t in sorted(member(cls, n) for n in names):
        if off < pos:
            raise ValueError("members overlap")
        fmt += "x" * (off - pos) + _FORMATS[t]
        pos = off + ctypes.sizeof(t)
    order = sorted(names, key=lambda n: member(cls, n)[0])
    if list(order) != list(names):
        raise ValueError(f"pass members in memory order: {order}")
    return struct.Struct(fmt)
