"""Reading generated ctypes layouts: member types and offsets, and fast unpackers.

The runtime never writes an offset down: it asks the generated classes, here,
once at import, and keeps struct.Struct unpackers for the hot paths.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import struct
from typing import Any, TypeVar, overload

_C = TypeVar("_C", bound="ctypes.Structure | ctypes.Union")

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


# ---- values headed for C: checked against the generated field types -------------------

@functools.cache
def field(cls: Any, name: str) -> tuple[Any, int | None]:
    """(ctypes type, bit width or None) of member `name` of cls, through anonymous members."""
    anonymous = getattr(cls, "_anonymous_", ())
    for entry in cls._fields_:
        if entry[0] == name:
            return entry[1], (entry[2] if len(entry) > 2 else None)
    for entry in cls._fields_:
        if entry[0] in anonymous:
            try:
                return field(entry[1], name)
            except KeyError:
                continue
    raise KeyError(f"{cls.__name__} has no member {name}")


def c_spelling(ctype: Any, bits: int | None = None) -> str:
    """How the uapi headers spell an integer type of this width and signedness (__u64, __s32)."""
    spelling = f"{'__s' if ctype(-1).value < 0 else '__u'}{ctypes.sizeof(ctype) * 8}"
    return f"{spelling} bitfield of {bits} bits" if bits is not None else spelling


@functools.cache
def bounds(ctype: Any, bits: int | None = None) -> tuple[int, int]:
    """The smallest and largest value a C integer of this type (or bitfield width) holds."""
    width = bits if bits is not None else ctypes.sizeof(ctype) * 8
    if ctype(-1).value < 0:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def check_int(value: Any, ctype: Any, what: str, bits: int | None = None, where: str = "") -> int:
    """value as an int that fits the C type, else TypeError/OverflowError naming `what`.

    ctypes would silently keep the low bits of an out-of-range value (2**64 + 1 becomes 1):
    every integer the runtime hands to KVM goes through here first.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        value = operator.index(value)     # refuses an __index__ that returns a non-int
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None
    lo, hi = bounds(ctype, bits)
    if not lo <= value <= hi:
        target = f"{where} ({c_spelling(ctype, bits)})" if where else c_spelling(ctype, bits)
        raise OverflowError(f"{what}={value:#x} does not fit {target}: "
                            f"the range is {lo:#x}..{hi:#x}")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    """value if it is True or False, else TypeError naming `what` (an int 1 is refused: a
    flag the kernel takes as a number is set from a bool, never from a count)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False (a bool), not {type(value).__name__}")
    return value


def check_field(value: Any, cls: Any, name: str, what: str | None = None,
                index: int | None = None) -> int:
    """value checked against member `name` of cls (element `index` of an array member), with
    the C type read from the generated class; `what` is the caller's parameter name."""
    ctype, bits = field(cls, name)
    where = f"{cls.__name__}.{name}"
    if index is not None:
        ctype, where = ctype._type_, f"{where}[{index}]"
    return check_int(value, ctype, what or name, bits, where)


@overload
def fill(obj: type[_C], names: dict[str, str] | None = None, /, **fields: Any) -> _C: ...
@overload
def fill(obj: _C, names: dict[str, str] | None = None, /, **fields: Any) -> _C: ...
def fill(obj: Any, names: dict[str, str] | None = None, /, **fields: Any) -> Any:
    """Set fields of a ctypes struct (a class makes a fresh one), each range-checked against
    its generated C type. names maps a field to the caller's parameter name for messages."""
    if isinstance(obj, type):
        obj = obj()
    cls: Any = type(obj)
    for name, value in fields.items():
        setattr(obj, name, check_field(value, cls, name, (names or {}).get(name)))
    return obj


def expect(obj: object, cls: type[_C], where: str) -> _C:
    """obj if it is a cls (the kernel reads sizeof(cls) bytes from it), else TypeError."""
    if not isinstance(obj, cls):
        raise TypeError(f"{where} takes a {cls.__name__}, not {type(obj).__name__}: "
                        f"the kernel reads {ctypes.sizeof(cls)} bytes of struct {cls.__name__} from it")
    return obj


def capacity(obj: Any) -> int:
    """Bytes the kernel may read or write at addressof(obj): to the end of the memory it is
    known to live in (the rest of the buffer it was made from, or else its own size)."""
    root = obj
    # Walk up only through bases that really contain the object: a pointer's .contents
    # names the pointer as its base, which says nothing about the memory pointed to.
    while (root._b_base_ is not None
           and ctypes.addressof(root._b_base_) <= ctypes.addressof(root)
           and ctypes.addressof(root) + ctypes.sizeof(root)
           <= ctypes.addressof(root._b_base_) + ctypes.sizeof(root._b_base_)):
        root = root._b_base_
    size = ctypes.sizeof(root)
    objects = root._objects if root._b_base_ is None else None
    source = objects.get("ffffffff") if isinstance(objects, dict) else None
    if isinstance(source, memoryview) and not source.readonly:
        start = ctypes.addressof(ctypes.c_char.from_buffer(source))
        if start <= ctypes.addressof(root) <= start + source.nbytes:
            size = start + source.nbytes - ctypes.addressof(root)
    return size - (ctypes.addressof(obj) - ctypes.addressof(root))


def check_flex(obj: Any, where: str) -> Any:
    """A flexible-array struct whose count member claims no more entries than its buffer holds."""
    cls = type(obj)
    count = getattr(obj, cls._flex_count_) if cls._flex_count_ else 0
    need = getattr(cls, cls._flex_field_).offset + count * ctypes.sizeof(cls._flex_type_)
    if need > capacity(obj):
        raise ValueError(f"{where}: {cls.__name__}.{cls._flex_count_} = {count} claims more "
                         f"entries than the object holds ({capacity(obj)} bytes, {need} needed); "
                         f"allocate it with {cls.__name__}.alloc(n)")
    return obj
