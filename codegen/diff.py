"""What changed in the KVM ABI between two header sets, and whether it breaks anything.

Each side is a pinned version ("6.1.4"), a folder laid out like headers/<version>/,
or a plain include directory such as /usr/include. Both are run through the
generator's own model and layout (which conformance checks against gcc), then
compared by C name.

Only the KVM ABI is judged: what linux/kvm.h and the arch's asm/kvm.h declare,
and the types those declarations use (a field's or array element's type, what a
pointer points at, an ioctl's argument type), followed transitively. Everything
else the KVM headers happen to include (prctl, hwcap, psci, sigcontext...) is
reported in a separate section, labelled as not KVM ABI, and never breaks.
Zero-size helper members (the `struct { } __empty_NAME;` that __DECLARE_FLEX_ARRAY
puts beside a flexible array) are not fields and are not compared.

Breaking: a type's size or alignment changed, a field moved or changed size, a
constant changed value, an ioctl was renumbered, or anything was removed (code
that names it stops working). Not breaking, because the kernel extends its ABI
this way: additions; reserved/padding fields shrinking or disappearing as new
fields take their bytes; a struct member growing inside its parent while each of its own old
fields keeps its place (kvm_run.system_event gaining data[]); a *_MAX sentinel
rising. --removals-ok reports removals without counting them as breaking.
The verdict line says which: "no changes", "additions only", "compatible, N
non-breaking changes [and M additions]", "compatible, N removals allowed" or
"BREAKING: N incompatible changes".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import headers
from .arches import Arch
from .errors import GeneratorError
from .layout import Layout
from .model import Aligned, Array, Model, Pointer, RecordRef
from .pipeline import build_model
from .probe import members

KVM_HEADERS = ("linux/kvm.h", "asm/kvm.h")


@dataclass
class Snapshot:
    label: str
    types: dict[str, tuple[int, int]]                       # C name -> (size, align)
    fields: dict[str, dict[str, tuple[int, ...]]]           # C name -> path -> layout
    records: set[tuple[str, str]]                           # (C name, path) of struct members
    constants: dict[str, int | str]
    ioctls: dict[str, int]
    where: dict[str, str] = field(default_factory=dict)     # type/constant/ioctl -> "file:line"
    kvm: set[str] = field(default_factory=set)              # the names that are KVM ABI
    unexpressed: dict[str, str] = field(default_factory=dict)   # macro -> why it has no value


def resolve(spec: str, arch: Arch) -> headers.HeaderSet:
    """A header set from a manifest version, a version folder or an include directory."""
    if spec in headers.load_manifest()["versions"]:
        return headers.from_manifest(spec, arch)
    path = Path(spec)
    if path.is_dir():
        return headers.from_include_dir(path, arch)
    raise GeneratorError(f"{spec!r} is neither a pinned kernel version nor a directory")


def snapshot(hs: headers.HeaderSet, arch: Arch, label: str) -> Snapshot:
    model, layout = build_model(hs, arch)
    return _snapshot(model, layout, label)


def _snapshot(model: Model, layout: Layout, label: str) -> Snapshot:
    types, fields, records, where, kvm = {}, {}, set(), {}, set()
    kvm_records = _kvm_records(model)
    for key, rec in model.records.items():
        if rec.c_name and rec.fields is not None:
            lay = layout.record(key)
            types[rec.c_name] = (lay.size, lay.align)
            where[rec.c_name] = f"{rec.file}:{rec.line}"
            if key in kvm_records:
                kvm.add(rec.c_name)
    for root, path, kind in members(model, layout):
        found = _field_layout(model, layout, root, path, kind)
        if found is None:
            continue    # a zero-size helper: no bytes, no name any code uses
        fields.setdefault(root, {})[path], is_record = found
        if is_record or kind == "record":
            records.add((root, path))
    ioctls = {name: io.number for name, io in model.ioctls.items()}
    constants = {name: c.value for name, c in model.constants.items() if name not in ioctls}
    for name, decl in [*model.constants.items(), *model.ioctls.items()]:
        where[name] = f"{decl.file}:{decl.line}"
        if decl.file in KVM_HEADERS:
            kvm.add(name)
    for e in model.enums:
        for name, value in e.members:
            if name not in constants:
                constants[name] = value
                where[name] = f"{e.file}:{e.line}"
                if e.file in KVM_HEADERS:
                    kvm.add(name)
    unexpressed = {}
    for sk in model.skipped:
        if sk.kind == "macro":
            unexpressed[sk.name] = f"still in {sk.file}:{sk.line}, but {sk.reason}"
            where.setdefault(sk.name, f"{sk.file}:{sk.line}")
            if sk.file in KVM_HEADERS:
                kvm.add(sk.name)
    return Snapshot(label, types, fields, records, constants, ioctls, where, kvm, unexpressed)


def _kvm_records(model: Model) -> set[str]:
    """Keys of the records the KVM headers declare, and of every record those use."""
    todo = [key for key, rec in model.records.items() if rec.file in KVM_HEADERS]
    todo += [io.arg_type for io in model.ioctls.values()
             if io.file in KVM_HEADERS and io.arg_type is not None]
    seen: set[str] = set()
    while todo:
        item = todo.pop()
        if not isinstance(item, str):       # a type: find the record it names, if any
            while isinstance(item, (Aligned, Array, Pointer)):
                item = item.inner if isinstance(item, Aligned) else \
                    item.element if isinstance(item, Array) else item.target
            if not isinstance(item, RecordRef):
                continue
            item = item.key
        if item in seen:
            continue
        seen.add(item)
        todo += [f.type for f in model.records[item].fields or []]
    return seen


def _field_layout(model: Model, layout: Layout, root: str, path: str,
                  kind: str) -> tuple[tuple, bool] | None:
    """((offset, size) in bytes, or ("bits", bit offset, width), and whether it holds a struct.

    None for a member whose type is an empty struct: __DECLARE_FLEX_ARRAY puts
    `struct { } __empty_NAME;` beside a flexible array so it may stand in a union.
    """
    key = next(k for k, r in model.records.items() if r.c_name == root)
    offset = 0
    lay = None
    for part in re.findall(r"\[\d+\]|\w+", path):
        if part.startswith("["):
            continue   # element [0]: no offset
        lay = _find(model, layout, key, part)
        if lay is None:
            raise GeneratorError(f"no member {part} in {root} ({path})")
        fl, extra = lay
        offset += extra
        if fl.bit_offset is not None:
            return ("bits", (offset * 8) + fl.bit_offset, fl.bit_size or 0), False
        offset += fl.offset
        t = fl.field.type
        while isinstance(t, (Aligned, Array)):
            t = t.inner if isinstance(t, Aligned) else t.element
        if isinstance(t, RecordRef):
            key = t.key
    assert lay is not None
    if isinstance(t, RecordRef) and layout.record(t.key).size == 0:
        return None
    return (offset, lay[0].size if kind != "flexible" else 0), isinstance(t, RecordRef)


def _find(model: Model, layout: Layout, key: str, name: str):
    """(FieldLayout, offset of the anonymous member holding it) for member `name` of key."""
    for fl in layout.record(key).fields:
        if fl.field.name == name:
            return fl, 0
        if fl.field.name is None and isinstance(fl.field.type, RecordRef):
            found = _find(model, layout, fl.field.type.key, name)
            if found is not None:
                return found[0], fl.offset + found[1]
    return None


@dataclass
class Change:
    kind: str          # "type", "field", "constant", "ioctl", "capability"
    name: str
    what: str          # "added", "removed", "changed", "moved", "renumbered", "resized"
    old: object = None
    new: object = None
    breaking: bool = False
    kvm: bool = True   # False: declared outside the KVM headers and not used by them
    where: str = ""    # the declaration's file:line (in the new headers, if it is there)
    note: str = ""     # for a macro that lost its value: why the new headers cannot give one

    def line(self) -> str:
        sign = {"added": "+", "removed": "-"}.get(self.what, "~")
        detail = ""
        if self.what not in ("added", "removed"):
            detail = f": {_fmt(self.old)} -> {_fmt(self.new)}"
        flag = "  [breaking]" if self.breaking else ""
        origin = f"  ({self.where})" if not self.kvm and self.where else ""
        note = f"  ({self.note})" if self.note else ""
        return (f"  {sign} {self.kind} {self.name}{' ' + self.what if sign == '~' else ''}"
                f"{detail}{flag}{origin}{note}")


def _fmt(v: object) -> str:
    if isinstance(v, int) and v > 9:
        return hex(v)
    if isinstance(v, tuple) and v and v[0] == "bits":
        return f"bits {v[1]}+{v[2]}"
    if isinstance(v, tuple) and len(v) == 2:
        return f"{v[0]}/{v[1]}"
    return repr(v)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


LEGEND = ("  (a ~ line shows old -> new. type: size/align in bytes; field: offset/size in bytes,\n"
          "   or bits OFFSET+WIDTH for a bitfield; constant and ioctl: the value, in hex above 9)")

_SECTIONS = (("type", "types"), ("field", "fields of surviving types"),
             ("constant", "constants"), ("ioctl", "ioctls"), ("capability", "capabilities"))


@dataclass
class Report:
    old: str
    new: str
    arch: str
    changes: list[Change] = field(default_factory=list)   # KVM ABI and outside it
    removals_ok: bool = False

    @property
    def kvm(self) -> list[Change]:
        return [c for c in self.changes if c.kvm]

    @property
    def outside(self) -> list[Change]:
        """Changes to what the KVM headers merely include: not KVM ABI, never breaking."""
        return [c for c in self.changes if not c.kvm]

    @property
    def breaking(self) -> list[Change]:
        return [c for c in self.changes if c.breaking]

    def of(self, kind: str, what: str | None = None) -> list[Change]:
        return [c for c in self.changes if c.kind == kind and (what is None or c.what == what)]

    @property
    def verdict(self) -> str:
        """One line: what happened to the KVM ABI."""
        kvm = [c for c in self.kvm if c.kind != "capability"]   # capabilities repeat constants
        if self.breaking:
            return f"BREAKING: {_n(len(self.breaking), 'incompatible change')}"
        if not kvm:
            return "no changes"
        removed = [c for c in kvm if c.what == "removed" and self.removals_ok and
                   not (c.kind == "field" and _RESERVED.search(c.name))]
        if removed:
            return f"compatible, {_n(len(removed), 'removal')} allowed"
        added = [c for c in kvm if c.what == "added"]
        if len(added) == len(kvm):
            return "additions only"
        others = _n(len(kvm) - len(added), "non-breaking change")
        return f"compatible, {others}" + (f" and {_n(len(added), 'addition')}" if added else "")

    def to_json(self) -> dict:
        return {"old": self.old, "new": self.new, "arch": self.arch,
                "kvm_headers": list(KVM_HEADERS), "verdict": self.verdict,
                "breaking": len(self.breaking),
                "changes": [_change_json(c) for c in self.kvm],
                "outside_kvm_headers": [_change_json(c) for c in self.outside]}

    def text(self) -> str:
        out = [f"KVM ABI diff for {self.arch}: {self.old} -> {self.new}",
               f"  (KVM ABI: what {' and '.join(KVM_HEADERS)} declare, and the types those use)",
               LEGEND]
        out += _sections(self.kvm, "")
        outside = self.outside
        out.append("outside the KVM headers (not KVM ABI, never breaking): "
                   + (_n(len(outside), "change") if outside else "no changes"))
        if outside:
            out += _sections(outside, "  ")
        out.append(self.verdict)
        return "\n".join(out)


def _sections(changes: list[Change], indent: str) -> list[str]:
    out = []
    for kind, title in _SECTIONS:
        cs = [c for c in changes if c.kind == kind]
        if indent and not cs:
            continue
        counts: dict[str, int] = {}
        for c in cs:
            counts[c.what] = counts.get(c.what, 0) + 1
        summary = ", ".join(f"{n} {w}" for w, n in sorted(counts.items())) or "no changes"
        out.append(f"{indent}{title}: {summary}")
        out += [indent + c.line() for c in cs]
    return out


def _change_json(c: Change) -> dict:
    return {"kind": c.kind, "name": c.name, "what": c.what, "old": _json(c.old),
            "new": _json(c.new), "breaking": c.breaking, "where": c.where,
            **({"note": c.note} if c.note else {})}


def _json(v: object) -> object:
    return list(v) if isinstance(v, tuple) else v


def compare(old: Snapshot, new: Snapshot, arch: str, removals_ok: bool = False) -> Report:
    r = Report(old.label, new.label, arch, removals_ok=removals_ok)
    r.changes = _changes(old, new, removals_ok)
    for c in r.changes:
        root = c.name.split(".")[0] if c.kind == "field" else c.name
        c.kvm = root in old.kvm or root in new.kvm
        c.where = new.where.get(root) or old.where.get(root, "")
        if c.what == "removed" and c.kind in ("constant", "ioctl"):
            c.note = new.unexpressed.get(c.name, "")
        if not c.kvm:
            c.breaking = False
    return r


def _changes(old: Snapshot, new: Snapshot, removals_ok: bool) -> list[Change]:
    changes: list[Change] = []
    removal_breaks = not removals_ok
    for name in sorted(new.types.keys() - old.types.keys()):
        changes.append(Change("type", name, "added", new=new.types[name]))
    for name in sorted(old.types.keys() - new.types.keys()):
        changes.append(Change("type", name, "removed", old=old.types[name], breaking=removal_breaks))
    for name in sorted(old.types.keys() & new.types.keys()):
        if old.types[name] != new.types[name]:
            changes.append(Change("type", name, "resized", old.types[name], new.types[name], True))
        of, nf = old.fields.get(name, {}), new.fields.get(name, {})
        for path in sorted(nf.keys() - of.keys()):
            changes.append(Change("field", f"{name}.{path}", "added", new=nf[path]))
        for path in sorted(of.keys() - nf.keys()):
            # padding that new fields took over entirely: as for padding that shrinks
            changes.append(Change("field", f"{name}.{path}", "removed", old=of[path],
                                  breaking=removal_breaks and not _RESERVED.search(path)))
        for path in sorted(of.keys() & nf.keys()):
            if of[path] != nf[path]:
                changes.append(_field_change(name, path, of, nf, (name, path) in old.records))
    for kind, o, n, renamed in (("constant", old.constants, new.constants, "changed"),
                                ("ioctl", old.ioctls, new.ioctls, "renumbered")):
        for name in sorted(n.keys() - o.keys()):
            changes.append(Change(kind, name, "added", new=n[name]))
        for name in sorted(o.keys() - n.keys()):
            changes.append(Change(kind, name, "removed", old=o[name], breaking=removal_breaks))
        for name in sorted(o.keys() & n.keys()):
            if o[name] != n[name]:
                sentinel = kind == "constant" and name.endswith("_MAX")
                changes.append(Change(kind, name, renamed, o[name], n[name], not sentinel))
    caps = sorted(n for n in new.constants.keys() - old.constants.keys() if n.startswith("KVM_CAP_"))
    for name in caps:
        changes.append(Change("capability", name, "added", new=new.constants[name]))
    return changes


_RESERVED = re.compile(r"(^|[._])(reserved|rsvd|pad|padding)\w*$")


def _field_change(name: str, path: str, old: dict, new: dict, is_record: bool) -> Change:
    o, n = old[path], new[path]
    label = f"{name}.{path}"
    if o[0] != n[0]:
        return Change("field", label, "moved", o, n, breaking=not _RESERVED.search(path))
    # A struct member that grew in place: its own fields are judged one by one (or, for a
    # named struct, the type's resize is reported); the member itself breaks nothing.
    grown_record = is_record and o[0] != "bits" and n[1] > o[1]
    return Change("field", label, "resized", o, n,
                  breaking=not (grown_record or _RESERVED.search(path)))


def diff(old_spec: str, new_spec: str, arch: Arch, removals_ok: bool = False) -> Report:
    old = snapshot(resolve(old_spec, arch), arch, old_spec)
    new = snapshot(resolve(new_spec, arch), arch, new_spec)
    return compare(old, new, arch.name, removals_ok)
