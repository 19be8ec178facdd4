"""Python names for C names: one rule for every name the generated modules define.

A C name is used unchanged unless Python cannot use it where it goes: it is not
an ASCII identifier, it is a keyword, it is reserved in that namespace (the
module's own names and the builtins its code calls; ctypes' _sunder_ internals
and the padding members the generator adds; Enum internals; any __dunder__), or
another name in the same namespace already has it. Then every character Python
does not allow becomes "_", a leading digit gets "_" in front, and "_" is
appended until the name is usable and free. Every rename is listed in the
module's RENAMED table.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field

from .families import FAMILIES
from .model import Model, Record, RecordRef

# Names the generated modules define or import (the helpers from _support and _plain among
# them), and the builtins their code calls or annotates with. _support's and _plain's own
# code are namespaces of their own: C names never reach them.
MODULE_RESERVED = frozenset({
    "annotations", "ctypes", "enum", "KERNEL_VERSION", "ARCH", "TYPE_CHECKING", "Any",
    "Ioctl", "IOCTLS", "EXIT_MEMBERS", "C_TYPES", "EMPTY_MACROS", "UNEXPRESSED", "RENAMED",
    "_ENUMS", "_Structure", "_Union", "_FlexibleStructure", "_Bitfield", "to_dict", "from_dict",
    "AttributeError", "bool", "bytes", "dict", "frozenset", "getattr", "globals", "int", "list",
    "object", "str", "tuple",
})
# Members ctypes or the generator use in a struct/union class (plus every _sunder_).
CLASS_RESERVED = frozenset({"alloc", "flex_array", "flex_capacity", "flex_nbytes", "from_address",
                            "from_buffer", "from_buffer_copy", "from_param", "in_dll", "_objects",
                            "_b_base_", "_b_needsfree_", "_pad_end", "_pad_size"})
_GENERATED_MEMBER = re.compile(r"_(?:anon|bits|pad)\d*")
ENUM_RESERVED = frozenset({"mro"})


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name[:2] == name[-2:] == "__" and name[2] != "_" and name[-3] != "_"


def is_sunder(name: str) -> bool:
    return len(name) > 2 and name[0] == name[-1] == "_" and name[1] != "_" and name[-2] != "_"


def _usable(name: str, kind: str) -> bool:
    if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name) or is_dunder(name):
        return False
    if kind == "module":
        return name not in MODULE_RESERVED
    if kind == "class":
        return name not in CLASS_RESERVED and not is_sunder(name) and \
            not _GENERATED_MEMBER.fullmatch(name)
    return name not in ENUM_RESERVED and not is_sunder(name)


def python_name(name: str, kind: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """The Python name for `name` in a namespace of `kind` ("module", "class" or "enum")
    whose names so far are `taken`."""
    if _usable(name, kind) and name not in taken:
        return name
    py = re.sub(r"[^A-Za-z0-9_]", "_", name.encode("ascii", "replace").decode()) or "_"
    if py[0].isdigit():
        py = "_" + py
    while not _usable(py, kind) or py in taken:
        py += "_"
    return py


@dataclass
class Plan:
    """Every Python name the generated modules use for a C name."""

    classes: dict[str, str] = field(default_factory=dict)     # record key -> class name
    values: dict[str, str] = field(default_factory=dict)      # macro / enum member -> module name
    enum_classes: dict[int, str] = field(default_factory=dict)  # index in model.enums -> class
    enum_members: dict[tuple[str, str], str] = field(default_factory=dict)  # (class, C) -> member
    renamed: dict[str, str] = field(default_factory=dict)     # what RENAMED lists


def assign(p: Plan, items: list[tuple[str, str]], kind: str, taken: set[str]) -> list[str]:
    """Python names for (RENAMED key, C name) items that share one namespace.

    Names usable as they are keep them first; the others are fitted around them,
    in order.
    """
    out: list[str | None] = []
    for _, name in items:
        keep = _usable(name, kind) and name not in taken
        out.append(name if keep else None)
        if keep:
            taken.add(name)
    for i, (key, name) in enumerate(items):
        if out[i] is None:
            out[i] = py = python_name(name, kind, taken)
            taken.add(py)
            p.renamed[key] = py
    return [py for py in out if py is not None]


def plan(model: Model) -> Plan:
    """Name everything, the same way for the same headers.

    Module level: the enum classes, then macros, enum members and records in header
    order. Members: per class, in declaration order, with the members of anonymous
    struct/union members counted in the class that lifts them.
    """
    p = Plan()
    taken = set(MODULE_RESERVED) | {fam.name for fam in FAMILIES}
    tagged = [(i, e) for i, e in enumerate(model.enums) if e.tag is not None and e.members]
    values = list(model.constants)
    values += [n for e in model.enums for n, _ in e.members if n not in model.constants]
    items = [(f"enum {e.tag}", "".join(part.capitalize() for part in e.tag.split("_")))
             for _, e in tagged]
    items += [(name, name) for name in dict.fromkeys(values)]
    items += [(rec.c_name or key, key) for key, rec in model.records.items()]
    pys = assign(p, items, "module", taken)
    p.enum_classes = {i: py for (i, _), py in zip(tagged, pys)}
    p.values = dict(zip(dict.fromkeys(values), pys[len(tagged):]))
    p.classes = dict(zip(model.records, pys[len(tagged) + len(p.values):]))
    for i, e in tagged:
        cls = p.enum_classes[i]
        members = assign(p, [(f"{cls}.{n}", n) for n, _ in e.members], "enum", set())
        for (n, _), py in zip(e.members, members):
            p.enum_members[(cls, n)] = py
    lifted = {f.type.key for rec in model.records.values() for f in rec.fields or []
              if f.name is None and isinstance(f.type, RecordRef)}
    for key, rec in model.records.items():
        if key not in lifted:
            cls = p.classes[key]
            fields = _scope(model, rec)
            for f, py in zip(fields, assign(p, [(f"{cls}.{f.name}", f.name or "") for f in fields],
                                            "class", set())):
                f.py_name = py if py != f.name else None
    return p


def _scope(model: Model, rec: Record) -> list:
    """The named members of rec, with those of its anonymous members, as ctypes lifts them."""
    out = []
    for f in rec.fields or []:
        if f.name is not None:
            out.append(f)
        elif isinstance(f.type, RecordRef) and f.bits is None:
            out += _scope(model, model.records[f.type.key])
    return out
