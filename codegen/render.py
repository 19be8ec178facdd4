"""Stage 5: render the model as a ctypes module (jinja2 templates in templates/).

ctypes lays structs out by its own rules, which match C's for plain members
but cannot express GCC's larger alignments (aligned(16), __int128) before
Python 3.13. So this stage simulates where ctypes would put each member and
inserts explicit padding wherever the C layout (from layout.py) differs;
_align_ is set as well, for the Pythons that honour it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import NamedTuple

import jinja2

from . import GENERATOR_VERSION, names
from .errors import GeneratorError
from .families import FAMILIES, FLEX_COUNT_FIELDS
from .layout import FieldLayout, Layout, round_up
from .model import Aligned, Array, Function, Int, Model, Pointer, RecordRef, Type, Void

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("codegen", "templates"),
    keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    undefined=jinja2.StrictUndefined)


class CType(NamedTuple):
    expr: str        # the ctypes type, as the module spells it: "ctypes.c_uint8 * 4"
    align: int       # ctypes' own alignment for it
    value_ann: str   # what reading such a member gives: "int", "bytes", "ctypes.Array[...]"
    ctype_ann: str   # the ctypes type as a type expression: "ctypes.Array[ctypes.c_uint8]"


@dataclass
class CtField:
    name: str
    ctype: str
    ann: str                   # what reading it gives (CType.value_ann)
    bits: int | None = None
    anonymous: str | None = None   # the record key of an anonymous member


def _bytes(name: str, n: int) -> CtField:
    """Padding or bitfield storage: n bytes ctypes must not interpret."""
    return CtField(name, f"ctypes.c_uint8 * {n}", "ctypes.Array[ctypes.c_uint8]")


@dataclass
class CtRecord:
    name: str
    base: str
    doc: str
    fields: list[CtField] = field(default_factory=list)
    anonymous: list[str] = field(default_factory=list)
    align: int | None = None
    pack: int | None = None
    # what reading each member ctypes exposes gives, as an annotation: (name, type)
    annotations: list[tuple[str, str]] = field(default_factory=list)
    # (field, element ctype, element type annotation, count field)
    flex: tuple[str, str, str, str | None] | None = None
    # bitfields ctypes cannot lay out: (name, storage member, bit offset in it, width, signed)
    properties: list[tuple[str, str, int, int, bool]] = field(default_factory=list)

    @property
    def class_annotations(self) -> list[tuple[str, str]]:
        """The annotations a class body can hold as they are."""
        return [(n, a) for n, a in self.annotations if not _mangled(n)]

    @property
    def checker_annotations(self) -> list[tuple[str, str]]:
        """The ones Python would mangle there (__x becomes _Class__x): for type checkers only."""
        return [(n, a) for n, a in self.annotations if _mangled(n)]


def _mangled(name: str) -> bool:
    return name.startswith("__") and not name.endswith("__")


class _Renderer:
    def __init__(self, model: Model, layout: Layout, plan: names.Plan) -> None:
        self.m = model
        self.layout = layout
        self.plan = plan
        self.ct_align: dict[str, int] = {}
        self.done: dict[str, CtRecord] = {}   # records rendered so far, by key

    # -- types
    def ctype(self, t: Type) -> CType:
        """The ctypes spelling of `t`, ctypes' own alignment for it, and its annotations."""
        if isinstance(t, Aligned):
            return self.ctype(t.inner)
        if isinstance(t, Int):
            if t.size == 16:
                array = "ctypes.Array[ctypes.c_uint64]"
                return CType("ctypes.c_uint64 * 2", 8, array, array)
            if t.cname == "char":
                return CType("ctypes.c_char", 1, "bytes", "ctypes.c_char")
            if t.cname == "_Bool":
                return CType("ctypes.c_bool", 1, "bool", "ctypes.c_bool")
            expr = f"ctypes.c_{'' if t.signed else 'u'}int{t.size * 8}"
            return CType(expr, t.size, "int", expr)
        if isinstance(t, Pointer):
            return CType("ctypes.c_void_p", self.m.arch.size("pointer"), "int | None",
                         "ctypes.c_void_p")
        if isinstance(t, Array):
            elem = self.ctype(t.element)
            expr = f"({elem.expr})" if " " in elem.expr else elem.expr
            array = f"ctypes.Array[{elem.ctype_ann}]"
            # ctypes reads a char array as the bytes before its first NUL, not as an Array
            value = "bytes" if elem.expr == "ctypes.c_char" else array
            return CType(f"{expr} * {t.length or 0}", elem.align, value, array)
        if isinstance(t, RecordRef):
            cls = self.plan.classes[t.key]
            return CType(cls, self.ct_align[t.key], cls, cls)
        if isinstance(t, (Void, Function)):
            raise GeneratorError("a void or function member has no ctypes form")
        raise TypeError(t)

    # -- records
    def record(self, key: str) -> CtRecord:
        rec = self.m.records[key]
        lay = self.layout.record(key)
        union = rec.kind == "union"
        c_desc = rec.c_name or f"anonymous {rec.kind} in {rec.parent}"
        doc = f"{c_desc} ({rec.file}:{rec.line}), {lay.size} bytes."
        out = CtRecord(self.plan.classes[key], "_Union" if union else "_Structure", doc)
        if rec.packed:
            out.pack = 1
        cur = 0                      # where ctypes has got to (structs)
        ct_align = 1
        npad = 0
        items = list(_runs(lay.fields, union))
        for i, item in enumerate(items):
            if isinstance(item, list):   # a run of bitfields in a struct
                nxt = items[i + 1] if i + 1 < len(items) else None
                limit = nxt.offset if isinstance(nxt, FieldLayout) else lay.size
                cur, ct_align, npad = self._bit_run(out, item, cur, ct_align, npad, rec, limit)
                continue
            fl = item
            f = fl.field
            expr, align, ann, _ = self.ctype(f.type)
            if rec.packed:
                align = 1
            if f.bits is not None:   # a bitfield in a union: ctypes puts it at bit 0 too
                name = f.py_name or f.name or f"_bits{npad}"
                npad += f.name is None
                out.fields.append(CtField(name, expr, ann, f.bits))
                ct_align = max(ct_align, align)
                continue
            name = f.py_name or f.name
            assert name is not None
            if not union and round_up(cur, align) != fl.offset:
                cur = self._pad(out, cur, fl.offset, align, rec)
            anonymous = None
            if f.name is None:
                assert isinstance(f.type, RecordRef)
                anonymous = f.type.key
                out.anonymous.append(name)
            out.fields.append(CtField(name, expr, ann, anonymous=anonymous))
            ct_align = max(ct_align, align)
            if not union:
                cur = fl.offset + fl.size
        if union:
            natural = max([self.layout.size_align(f.field.type)[0] for f in lay.fields] + [0])
            if round_up(natural, ct_align) != lay.size:
                out.fields.append(_bytes("_pad_size", lay.size))
        elif round_up(cur, ct_align) != lay.size:
            if round_up(cur, ct_align) > lay.size:
                raise GeneratorError(f"ctypes cannot express the layout of {c_desc}",
                                     rec.file, rec.line)
            out.fields.append(_bytes("_pad_end", lay.size - cur))
        if lay.align > ct_align:
            out.align = lay.align
        self.ct_align[key] = ct_align if out.pack is None else 1
        out.annotations = self._annotations(out)
        out.flex = self._flex(key)
        if out.flex and not union:
            entry = out.flex[2]
            # quoted when a class: it may be declared further down
            out.base = f'_FlexibleStructure["{entry}"]' if entry in self.plan.classes.values() \
                else f"_FlexibleStructure[{entry}]"
        self.done[key] = out
        return out

    def _annotations(self, out: CtRecord) -> list[tuple[str, str]]:
        """Every member ctypes lets you read on an instance, with what reading it gives.
        An anonymous member is not one of them: ctypes lifts its members into this class
        instead (but not its properties, which ctypes does not know about)."""
        anns: dict[str, str] = {}
        for f in out.fields:
            if f.anonymous is None:
                anns[f.name] = f.ann
            else:
                anns.update(self.done[f.anonymous].annotations)
        return list(anns.items())

    def _bit_run(self, out: CtRecord, run: list, cur: int, ct_align: int, npad: int, rec,
                 limit: int):
        """Lay out consecutive bitfields: as ctypes bitfields where ctypes packs them
        as GCC does (one type, no zero-width or unnamed members, and the storage unit
        ends before the next member at `limit`), else as a byte array with a property
        per bitfield."""
        types = {self.ctype(fl.field.type).expr for fl in run}
        if len(types) == 1 and all(fl.field.name and fl.field.bits for fl in run) and not rec.packed:
            expr, align, ann, _ = self.ctype(run[0].field.type)
            first_unit = run[0].offset
            last = run[-1]
            if cur <= first_unit and first_unit % align == 0 and \
                    run[0].bit_offset == first_unit * 8 and last.offset + last.size <= limit:
                if round_up(cur, align) != first_unit:
                    cur = self._pad(out, cur, first_unit, align, rec)
                for fl in run:
                    name = fl.field.py_name or fl.field.name
                    out.fields.append(CtField(name, expr, ann, fl.field.bits))
                return last.offset + last.size, max(ct_align, align), npad
        start = min(fl.bit_offset for fl in run) // 8
        end = (max(fl.bit_offset + fl.bit_size for fl in run) + 7) // 8
        if start < cur:
            raise GeneratorError(f"ctypes cannot place the bitfields of "
                                 f"{rec.c_name or rec.key} at byte {start}", rec.file, rec.line)
        if start > cur:
            out.fields.append(_bytes(f"_pad{len(out.fields)}", start - cur))
        storage = f"_bits{npad}"
        out.fields.append(_bytes(storage, end - start))
        for fl in run:
            if fl.field.name:
                t = fl.field.type
                signed = isinstance(t, Int) and t.signed
                out.properties.append((fl.field.py_name or fl.field.name, storage,
                                       fl.bit_offset - start * 8, fl.bit_size, signed))
        return end, ct_align, npad + 1

    def _pad(self, out: CtRecord, cur: int, offset: int, align: int, rec) -> int:
        if offset < cur or round_up(offset, align) != offset:
            raise GeneratorError(f"ctypes cannot place a member of "
                                 f"{rec.c_name or rec.key} at offset {offset}", rec.file, rec.line)
        if round_up(cur, align) != offset:
            out.fields.append(_bytes(f"_pad{len(out.fields)}", offset - cur))
        return offset

    def _flex(self, key: str) -> tuple[str, str, str, str | None] | None:
        """(member, element ctype, its annotation, count member) if the record ends in a
        flexible array."""
        rec = self.m.records[key]
        if rec.kind != "struct" or not rec.fields or rec.c_name is None:
            return None
        last = rec.fields[-1]
        while last.name is None and isinstance(last.type, RecordRef):
            inner = self.m.records[last.type.key]
            if not inner.fields:
                return None
            last = inner.fields[-1]
        if not (isinstance(last.type, Array) and not last.type.length and last.name):
            return None
        count = FLEX_COUNT_FIELDS.get(key)
        if count is not None:
            member = next((f for f in rec.fields if f.name == count), None)
            if member is None:
                raise GeneratorError(f"families.FLEX_COUNT_FIELDS names {key}.{count}, which "
                                     f"does not exist")
            count = member.py_name or count
        entry = self.ctype(last.type.element)
        return last.py_name or last.name, entry.expr, entry.ctype_ann, count

    def order(self) -> list[str]:
        """Records with every by-value dependency before its user."""
        done: list[str] = []
        seen: set[str] = set()

        def deps(t: Type):
            while isinstance(t, (Aligned, Array)):
                t = t.inner if isinstance(t, Aligned) else t.element
            if isinstance(t, RecordRef):
                yield t.key

        def visit(root: str) -> None:   # depth-first, with a stack: chains can be long
            stack = [(root, iter(self.m.records[root].fields or []))]
            seen.add(root)
            while stack:
                key, fields = stack[-1]
                for f in fields:
                    d = next(deps(f.type), None)
                    if d is not None and d not in seen:
                        seen.add(d)
                        stack.append((d, iter(self.m.records[d].fields or [])))
                        break
                else:
                    stack.pop()
                    done.append(key)

        for key, rec in self.m.records.items():
            if rec.fields is not None and key not in seen:
                visit(key)
        return done


def _runs(fields, union: bool):
    """Members one by one, except that a struct's consecutive bitfields come as a list."""
    run: list = []
    for fl in fields:
        if fl.field.bits is not None and not union:
            run.append(fl)
            continue
        if run:
            yield run
            run = []
        yield fl
    if run:
        yield run


def _families(model: Model, plan: names.Plan) -> list[dict]:
    """The declared enum classes (codegen/families.py) these headers have members for."""
    out = []
    for fam in FAMILIES:
        members = []
        origin = None
        if fam.enum is not None:   # one C enum, in its own order
            for e in model.enums:
                if e.tag == fam.enum:
                    members += [(n, str(v)) for n, v in e.members]
                    origin = f"enum {e.tag} ({e.file}:{e.line})."
        else:
            for name in model.macro_order:
                c = model.constants.get(name)
                if c is not None and name.startswith(fam.prefix) and isinstance(c.value, int):
                    members.append((name, _py_value(c.value, c.hex)))
            members += [(n, str(v)) for e in model.enums if e.tag is None for n, v in e.members
                        if n.startswith(fam.prefix) and n not in model.constants]
        for name, _ in members:
            if not name.startswith(fam.prefix):
                raise GeneratorError(f"enum {fam.enum}: member {name} lacks the prefix "
                                     f"{fam.prefix} that codegen/families.py declares for it",
                                     *_where(model, name))
        members = [(name[len(fam.prefix):], value, name) for name, value in members
                   if not fam.excludes(name)]
        if not members:
            continue
        pys = names.assign(plan, [(f"{fam.name}.{m}", m) for m, _, _ in members], "enum", set())
        members = [(py, value, name) for py, (_, value, name) in zip(pys, members)]
        if fam.unique:
            seen: dict[int, str] = {}
            for _, value, name in members:
                value = int(value, 0)
                if value in seen:
                    raise GeneratorError(f"enum family {fam.name}: {name} and {seen[value]} are both "
                                         f"{value}; add an exclusion to codegen/families.py",
                                         *_where(model, name))
                seen[value] = name
        out.append({"name": fam.name, "doc": fam.doc, "origin": origin, "flag": fam.flag,
                    "members": members})
    return out


def _where(model: Model, name: str) -> tuple[str | None, int | None]:
    c = model.constants.get(name)
    if c is not None:
        return c.file, c.line
    return next(((e.file, e.line) for e in model.enums if name in dict(e.members)), (None, None))


def _c_enums(model: Model, plan: names.Plan) -> list[dict]:
    """C enums codegen/families.py does not declare, as the C spells them (the pinned
    headers have none: tests/test_families.py checks)."""
    declared = {fam.enum for fam in FAMILIES if fam.enum is not None}
    out = []
    for i, e in enumerate(model.enums):
        cls = plan.enum_classes.get(i)
        if cls is None:
            continue
        if e.tag in declared:   # rendered under its declared name, prefix dropped
            plan.renamed = {k: v for k, v in plan.renamed.items()
                            if k != f"enum {e.tag}" and not k.startswith(f"{cls}.")}
            continue
        out.append({"name": cls, "tag": e.tag, "file": e.file, "line": e.line,
                    "members": [(plan.enum_members[(cls, n)], v) for n, v in e.members]})
    return out


def _py_tuple(names: tuple[str, ...] | None) -> str:
    """("vm", "vcpu") as Python source; None stays None."""
    if names is None:
        return "None"
    return "(" + ", ".join(f'"{n}"' for n in names) + ("," if len(names) == 1 else "") + ")"


def _py_value(v: int | str, as_hex: bool = False) -> str:
    if isinstance(v, str):
        return repr(v)
    return hex(v) if as_hex and v > 9 else str(v)


def render_module(model: Model, layout: Layout) -> str:
    plan = names.plan(model)
    c_enums = _c_enums(model, plan)   # first: it drops the plan's names for declared C enums
    families = _families(model, plan)
    r = _Renderer(model, layout, plan)
    records = [r.record(k) for k in r.order()]
    declared = [plan.classes[k] for k, rec in model.records.items() if rec.fields is not None]
    by_name = {rec.name: rec for rec in records}
    c_types = sorted((rec.c_name, plan.classes[key]) for key, rec in model.records.items()
                     if rec.c_name and rec.fields is not None)
    ioctls = []
    for io in model.ioctls.values():
        arg = None
        if io.arg_type is not None:
            try:
                arg = r.ctype(io.arg_type).expr
            except GeneratorError:
                arg = None
        ioctls.append({"name": io.name, "number": io.number, "direction": io.direction,
                       "size": io.size, "arg": arg, "arg_c": io.arg_c, "fd": io.fd,
                       "capability": io.capability})
    constants = [(plan.values[c.name], _py_value(c.value, c.hex)) for c in model.constants.values()]
    enum_consts = [(plan.values[n], v) for e in model.enums for n, v in e.members
                   if n not in model.constants]
    public = ["KERNEL_VERSION", "ARCH", *(n for n, _ in constants), *(n for n, _ in enum_consts),
              *(fam["name"] for fam in families), *(e["name"] for e in c_enums), *declared,
              "Ioctl", "IOCTLS", "EXIT_MEMBERS", "C_TYPES", "EMPTY_MACROS", "UNEXPRESSED",
              "RENAMED", "to_dict", "from_dict"]
    return render_template("abi.py.j2",
        m=model, gen_version=GENERATOR_VERSION, records=[by_name[k] for k in declared],
        ordered=records, constants=constants, enum_consts=enum_consts,
        families=families, c_enums=c_enums, ioctls=ioctls, c_types=c_types,
        skipped=model.skipped, empty=model.empty_macros, files=sorted(model.files.items()),
        byteorder=model.arch.byteorder, exit_members=model.exit_members,
        renamed=sorted(plan.renamed.items()), py_value=_py_value, py_tuple=_py_tuple,
        all_lines=textwrap.wrap(" ".join(f'"{n}",' for n in public), 96,
                                break_long_words=False, break_on_hyphens=False))


def render_template(name: str, **kw) -> str:
    return _ENV.get_template(name).render(**kw)


def render_enums(model: Model) -> str:
    plan = names.plan(model)
    c_enums = _c_enums(model, plan)
    return render_template("enums.py.j2", m=model, gen_version=GENERATOR_VERSION,
                           files=sorted(model.files.items()), families=_families(model, plan),
                           c_enums=c_enums, py_value=_py_value)


def render_support() -> str:
    """The helpers every arch module imports: the same file for every arch and kernel."""
    return render_template("support.py.j2", gen_version=GENERATOR_VERSION)


def render_plain() -> str:
    """to_dict() and from_dict(), which every arch module imports: the same file for every
    arch and kernel."""
    return render_template("plain.py.j2", gen_version=GENERATOR_VERSION)


def typing_flag(arch: str) -> str:
    """The constant a type checker is told is true to see `arch` as kvm_bindings.abi."""
    return f"KVM_BINDINGS_TYPING_{arch.upper()}"


_ENV.filters["typing_flag"] = typing_flag


def render_init(arches, version: str, source: str) -> str:
    """The package: the host's arch at run time; for type checkers, x86_64 (or the one arch
    generated) unless a typing_flag() picks another."""
    arches = list(arches)
    default = "x86_64" if "x86_64" in arches else arches[0]
    return _ENV.get_template("init.py.j2").render(
        arches=arches, version=version, source=source, gen_version=GENERATOR_VERSION,
        default=default, others=[a for a in arches if a != default], typing_flag=typing_flag)
