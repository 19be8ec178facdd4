"""Stage 3: the model -- plain dataclasses for what the headers declare.

Built from the pycparser AST plus the lifted attributes. Array sizes and macro
values are evaluated here (with evaluate.py, which asks layout.py for sizeof),
so later stages see numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pycparser import c_ast

from .arches import Arch
from .errors import GeneratorError
from .parse import INT128, PRELUDE_FILE, UINT128, Attribute, Parsed

# Larger types are refused: gcc's limit is 2**63 bytes, and ctypes fails on sizes near it.
MAX_SIZE = 1 << 40

# ---- types ---------------------------------------------------------------

@dataclass(frozen=True)
class Int:
    size: int
    signed: bool
    cname: str            # the C spelling of the base type, e.g. "unsigned long long"


@dataclass(frozen=True)
class Pointer:
    target: Type


@dataclass(frozen=True)
class Array:
    element: Type
    length: int | None    # None: a flexible array member


@dataclass(frozen=True)
class RecordRef:
    key: str


@dataclass(frozen=True)
class Void:
    pass


@dataclass(frozen=True)
class Function:
    """A function type: only ever seen behind a pointer (signal handlers)."""


@dataclass(frozen=True)
class Aligned:
    """A type with a GCC aligned attribute. exact: from a typedef, which may also lower it."""

    inner: Type
    align: int
    exact: bool


Type = Int | Pointer | Array | RecordRef | Void | Function | Aligned


def strip_aligned(t: Type) -> Type:
    while isinstance(t, Aligned):
        t = t.inner
    return t


# ---- declarations --------------------------------------------------------

@dataclass
class Field:
    name: str | None            # None: an anonymous struct/union member
    type: Type
    bits: int | None = None     # bitfield width
    py_name: str | None = None  # the Python attribute name, when it differs
    file: str | None = None
    line: int | None = None


@dataclass
class Record:
    key: str                    # unique Python class name
    kind: str                   # "struct" or "union"
    tag: str | None
    c_name: str | None          # C spelling that names it alone ("struct kvm_regs"), if any
    file: str
    line: int
    fields: list[Field] | None = None   # None: declared but never defined
    packed: bool = False
    align: int | None = None
    parent: str | None = None   # for anonymous records: the record they are declared in

    @property
    def is_anonymous_member_type(self) -> bool:
        return self.c_name is None


@dataclass
class EnumDecl:
    tag: str | None
    members: list[tuple[str, int]]
    file: str
    line: int


@dataclass
class Constant:
    name: str
    value: int | str
    ctype: Int | None           # None for string constants
    file: str
    line: int
    hex: bool = False           # the header writes it in hex (so will we)


@dataclass
class Ioctl:
    name: str
    number: int
    direction: str              # "none", "write", "read" or "readwrite"
    type: int                   # the ioctl "type" byte (KVMIO is 0xAE)
    nr: int
    size: int
    arg_type: Type | None       # what the size is the sizeof of, if it is a sizeof
    arg_c: str | None           # that type's C spelling
    file: str
    line: int
    fd: tuple[str, ...] | None = None           # fd kinds kvm.h's comments say, else None
    capability: tuple[str, ...] | None = None   # KVM_CAP_* a comment says gates it


@dataclass
class Skipped:
    """Something in the headers the bindings do not express, and why."""

    name: str
    kind: str
    reason: str
    file: str
    line: int


@dataclass
class Model:
    arch: Arch
    version: str
    source: str
    files: dict[str, str] = field(default_factory=dict)        # header -> sha256
    records: dict[str, Record] = field(default_factory=dict)
    typedefs: dict[str, Type] = field(default_factory=dict)
    enums: list[EnumDecl] = field(default_factory=list)
    enum_values: dict[str, int] = field(default_factory=dict)
    constants: dict[str, Constant] = field(default_factory=dict)
    ioctls: dict[str, Ioctl] = field(default_factory=dict)
    empty_macros: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    macro_order: list[str] = field(default_factory=list)
    exit_members: dict[str, str] = field(default_factory=dict)  # KVM_EXIT_* -> kvm_run member


# ---- building ------------------------------------------------------------

_INT_NAMES = {
    "char": ("char", None), "signed char": ("char", True), "unsigned char": ("char", False),
    "short": ("short", True), "short int": ("short", True), "signed short": ("short", True),
    "signed short int": ("short", True), "unsigned short": ("short", False),
    "unsigned short int": ("short", False),
    "int": ("int", True), "signed": ("int", True), "signed int": ("int", True),
    "unsigned": ("int", False), "unsigned int": ("int", False),
    "long": ("long", True), "long int": ("long", True), "signed long": ("long", True),
    "signed long int": ("long", True), "unsigned long": ("long", False),
    "unsigned long int": ("long", False),
    "long long": ("long long", True), "long long int": ("long long", True),
    "signed long long": ("long long", True), "signed long long int": ("long long", True),
    "unsigned long long": ("long long", False), "unsigned long long int": ("long long", False),
    "_Bool": ("_Bool", False),
}


def int_type(arch: Arch, cname: str) -> Int:
    base, signed = _INT_NAMES[cname]
    if signed is None:
        signed = arch.char_signed
    return Int(arch.size(base), signed, cname)


class Builder:
    def __init__(self, model: Model, parsed: Parsed, evaluator_factory) -> None:
        self.m = model
        self.parsed = parsed
        self.decl_attrs: dict[tuple[str, int, int], list[Attribute]] = {}
        self.record_attrs: dict[tuple[str, int, int], list[Attribute]] = {}
        for a in parsed.attributes:
            table = self.decl_attrs if a.target == "decl" else self.record_attrs
            table.setdefault((a.file, a.line, a.column), []).append(a)
        self.used_attrs: set[int] = set()
        self.enum_types: dict[str, Int] = {}
        self.anon_count = 0
        self.defining: set[str] = set()   # records whose member list is being read
        self.on_complete = lambda key: None   # called with each record once it is defined
        self.evaluate = evaluator_factory(model)

    # -- entry
    def build(self) -> None:
        for node in self.parsed.ast.ext:
            coord = node.coord
            if coord is not None and coord.file == PRELUDE_FILE:
                continue
            if isinstance(node, c_ast.Typedef):
                t = self.type_of(node.type, owner=None, hint=node.name)
                t = self._with_decl_attrs(t, node, exact=True)
                self.m.typedefs[node.name] = t
            elif isinstance(node, c_ast.Decl) and node.name is None:
                self.type_of(node.type, owner=None, hint=None)   # a tag definition
            elif isinstance(node, c_ast.Decl):
                self.m.skipped.append(Skipped(node.name, "declaration",
                                              "objects and functions have no place in bindings",
                                              coord.file, coord.line))
            elif isinstance(node, c_ast.FuncDef):
                self.m.skipped.append(Skipped(node.decl.name, "function",
                                              "function definitions have no place in bindings",
                                              coord.file, coord.line))
            elif isinstance(node, (c_ast.StaticAssert, c_ast.Pragma)):
                self._static_assert_or_pragma(node)
            else:
                raise GeneratorError(f"unexpected top-level {type(node).__name__}",
                                     coord.file if coord else None, coord.line if coord else None)
        unused = [a for a in self.parsed.attributes if id(a) not in self.used_attrs]
        if unused:
            a = unused[0]
            raise GeneratorError(f"__attribute__(({a.kind})) could not be tied to a declaration",
                                 a.file, a.line)

    def _static_assert_or_pragma(self, node) -> None:
        coord = node.coord
        if isinstance(node, c_ast.Pragma):
            raise GeneratorError(f"unsupported #pragma {node.string}: the generator does not "
                                 f"know how it changes layout", coord.file, coord.line)
        if not self.evaluate(node.cond):
            msg = node.message.value if node.message is not None else "(no message)"
            raise GeneratorError(f"static assertion failed: {msg}", coord.file, coord.line)

    def _attrs_at(self, table, coord) -> list[Attribute]:
        if coord is None:
            return []
        found = table.get((coord.file, coord.line, coord.column), [])
        for a in found:
            self.used_attrs.add(id(a))
        return found

    def _with_decl_attrs(self, t: Type, node, exact: bool) -> Type:
        for a in self._attrs_at(self.decl_attrs, node.coord):
            if a.kind == "aligned":
                t = Aligned(t, a.value or 16, exact)
            else:
                raise GeneratorError("packed on a declarator is not supported", a.file, a.line)
        return t

    # -- types
    def type_of(self, node, owner: str | None, hint: str | None) -> Type:
        if isinstance(node, c_ast.TypeDecl):
            return self.type_of(node.type, owner, hint)
        if isinstance(node, c_ast.IdentifierType):
            return self._named_type(node)
        if isinstance(node, c_ast.PtrDecl):
            return Pointer(self.type_of(node.type, owner, None))
        if isinstance(node, c_ast.ArrayDecl):
            elem = self.type_of(node.type, owner, hint)
            if node.dim is None:
                return Array(elem, None)
            n = int(self.evaluate(node.dim))
            if n < 0 or n >= MAX_SIZE:
                raise GeneratorError("size of array is negative" if n < 0 else
                                     f"array of {n} elements is larger than the generator "
                                     f"lays out", node.dim.coord.file, node.dim.coord.line)
            return Array(elem, n)
        if isinstance(node, (c_ast.Struct, c_ast.Union)):
            return RecordRef(self.record(node, owner, hint))
        if isinstance(node, c_ast.Enum):
            return self.enum(node)
        if isinstance(node, c_ast.Typename):
            return self.type_of(node.type, owner, hint)
        if isinstance(node, c_ast.FuncDecl):
            return Function()
        raise GeneratorError(f"unsupported declarator {type(node).__name__}",
                             node.coord.file if node.coord else None,
                             node.coord.line if node.coord else None)

    def _named_type(self, node: c_ast.IdentifierType) -> Type:
        names = " ".join(node.names)
        if names == "void":
            return Void()
        if names in (INT128, UINT128):
            return Aligned(Int(16, names == INT128, "__int128" if names == INT128
                               else "unsigned __int128"), 16, True)
        if names in _INT_NAMES:
            return int_type(self.m.arch, names)
        if len(node.names) == 1 and names in self.m.typedefs:
            return self.m.typedefs[names]
        raise GeneratorError(f"unknown type {names!r}", node.coord.file if node.coord else None,
                             node.coord.line if node.coord else None)

    def enum(self, node: c_ast.Enum) -> Type:
        if node.values is None:
            if node.name in self.enum_types:
                return self.enum_types[node.name]
            return Int(4, False, "unsigned int")
        members, value = [], -1
        for e in node.values.enumerators:
            value = int(self.evaluate(e.value)) if e.value is not None else value + 1
            members.append((e.name, value))
            self.m.enum_values[e.name] = value
        self.m.enums.append(EnumDecl(node.name, members, node.coord.file, node.coord.line))
        # GCC picks unsigned int unless a member is negative; wider only past 32 bits.
        lo = min(v for _, v in members) if members else 0
        hi = max(v for _, v in members) if members else 0
        if lo < 0:
            t = Int(4, True, "int") if lo >= -(1 << 31) and hi < (1 << 31) else Int(8, True, "long")
        else:
            t = Int(4, False, "unsigned int") if hi < (1 << 32) else Int(8, False, "unsigned long")
        if node.name:
            self.enum_types[node.name] = t
        return t

    def record(self, node, owner: str | None, hint: str | None) -> str:
        kind = "struct" if isinstance(node, c_ast.Struct) else "union"
        if node.name:
            key = node.name
            rec = self.m.records.get(key)
            if rec is not None and rec.kind != kind:
                raise GeneratorError(f"struct and union both named {key!r}",
                                     node.coord.file, node.coord.line)
            if rec is None:
                rec = Record(key, kind, node.name, f"{kind} {node.name}",
                             node.coord.file, node.coord.line)
                self.m.records[key] = rec
        else:
            if owner is None:
                key = hint or self._fresh(f"_anon_{kind}")
                c_name = hint  # typedef struct { ... } name;
            else:
                key = self._fresh(f"{owner}_{hint}" if hint else f"{owner}_{kind[0]}")
                c_name = None
            rec = Record(key, kind, None, c_name, node.coord.file, node.coord.line,
                         parent=owner)
            self.m.records[key] = rec
        if node.decls is not None:
            if rec.fields is not None and node.name:
                raise GeneratorError(f"{kind} {node.name} is defined twice",
                                     node.coord.file, node.coord.line)
            for a in self._attrs_at(self.record_attrs, node.coord):
                if a.kind == "packed":
                    rec.packed = True
                else:
                    rec.align = max(rec.align or 1, a.value or 16)
            rec.fields = []
            named_owner = rec.key if rec.c_name or owner is None else owner
            self.defining.add(rec.key)
            for d in node.decls:
                if isinstance(d, (c_ast.StaticAssert, c_ast.Pragma)):
                    self._static_assert_or_pragma(d)
                    continue
                f = self._field(d, named_owner, rec)
                if f is not None:
                    rec.fields.append(f)
            self.defining.discard(rec.key)
            self._check_names(rec)
            self.on_complete(rec.key)
        return rec.key

    def _fresh(self, base: str) -> str:
        key, n = base, 1
        while key in self.m.records:
            n += 1
            key = f"{base}{n}"
        return key

    def _field(self, d: c_ast.Decl, owner: str, rec: Record) -> Field | None:
        """One member, checked as gcc checks it; None for a declaration that declares
        no member ("int;", or "struct tag {...};", which only defines the tag)."""
        t = self.type_of(d.type, owner, d.name)
        t = self._with_decl_attrs(t, d, exact=False)
        bits = int(self.evaluate(d.bitsize)) if d.bitsize is not None else None
        coord = d.coord or (d.bitsize or d.type).coord   # pycparser: none on ": 3;"
        where = (coord.file, coord.line)
        label = f"'{d.name}'" if d.name else "an unnamed member"
        if d.name is None and bits is None:
            tagged = isinstance(d.type, (c_ast.Struct, c_ast.Union)) and d.type.name
            if not isinstance(t, RecordRef) or tagged:
                return None
        inner = strip_aligned(t)
        while isinstance(inner, Array):
            inner = strip_aligned(inner.element)
        if isinstance(inner, RecordRef):
            target = self.m.records[inner.key]
            if target.fields is None or inner.key in self.defining:
                raise GeneratorError(f"field {label} has incomplete type "
                                     f"{target.c_name or target.key}", *where)
        if isinstance(inner, (Void, Function)):
            raise GeneratorError(f"field {label} is declared as a "
                                 f"{'function' if isinstance(inner, Function) else 'void'}",
                                 *where)
        if bits is not None:
            base = strip_aligned(t)
            if not isinstance(base, Int):
                raise GeneratorError(f"bit-field {label} has an invalid type", *where)
            width = 1 if base.cname == "_Bool" else base.size * 8
            if bits < 0:
                raise GeneratorError(f"negative width in bit-field {label}", *where)
            if bits == 0 and d.name:
                raise GeneratorError(f"zero width for bit-field {label}", *where)
            if bits > width:
                raise GeneratorError(f"width of {label} exceeds its type", *where)
        return Field(d.name, t, bits, file=coord.file, line=coord.line)

    def _member_names(self, rec: Record) -> list[tuple[str, Field]]:
        out = []
        for f in rec.fields or []:
            if f.name is not None:
                out.append((f.name, f))
            elif isinstance(f.type, RecordRef) and f.bits is None:
                out += self._member_names(self.m.records[f.type.key])
        return out

    def _check_names(self, rec: Record) -> None:
        assert rec.fields is not None
        seen: set[str] = set()
        for name, f in self._member_names(rec):
            if name in seen:
                raise GeneratorError(f"duplicate member '{name}'", f.file, f.line)
            seen.add(name)
        anon = 0
        for f in rec.fields:
            if f.name is None:
                if not (isinstance(f.type, RecordRef) and f.bits is None):
                    continue  # an unnamed bitfield: padding only
                f.py_name = f"_anon{anon}"
                anon += 1
