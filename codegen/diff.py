"""What changed in the KVM ABI between two header sets, and whether it breaks anything.

Each side is a pinned version ("6.1.4"), a folder laid out like headers/<version>/,
or a plain include directory such as /usr/include. Both are run through the
generator's own model and layout (which conformance checks against gcc), then
compared by C name.

Breaking: a type's size or alignment changed, a field moved or changed size, a
constant changed value, an ioctl was renumbered, or anything was removed (code
that names it stops working). Not breaking, because the kernel extends its ABI
this way: additions; reserved/padding fields shrinking as new fields take their
bytes; a struct member growing inside its parent while each of its own old
fields keeps its place (kvm_run.system_event gaining data[]); a *_MAX sentinel
rising. --removals-ok reports removals without counting them as breaking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import headers
from .arches import Arch
from .errors import GeneratorError
from .layout import Layout
from .model import Model
from .pipeline import build_model
from .probe import members


@dataclass
class Snapshot:
    label: str
    types: dict[str, tuple[int, int]]                       # C name -> (size, align)
    fields: dict[str, dict[str, tuple[int, ...]]]           # C name -> path -> layout
    records: set[tuple[str, str]]                           # (C name, path) of struct members
    constants: dict[str, int | str]
    ioctls: dict[str, int]


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
    types, fields, records = {}, {}, set()
    for key, rec in model.records.items():
        if rec.c_name and rec.fields is not None:
            lay = layout.record(key)
            types[rec.c_name] = (lay.size, lay.align)
    for root, path, kind in members(model, layout):
        fields.setdefault(root, {})[path], is_record = _field_layout(model, layout, root, path, kind)
        if is_record or kind == "record":
            records.add((root, path))
    ioctls = {name: io.number for name, io in model.ioctls.items()}
    constants = {name: c.value for name, c in model.constants.items() if name not in ioctls}
    for e in model.enums:
        for name, value in e.members:
            constants.setdefault(name, value)
    return Snapshot(label, types, fields, records, constants, ioctls)


def _field_layout(model: Model, layout: Layout, root: str, path: str,
                  kind: str) -> tuple[tuple, bool]:
    """((offset, size) in bytes, or ("bits", bit offset, width), and whether it holds a struct."""
    from .model import Aligned, Array, RecordRef
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
    return (offset, lay[0].size if kind != "flexible" else 0), isinstance(t, RecordRef)


def _find(model: Model, layout: Layout, key: str, name: str):
    """(FieldLayout, offset of the anonymous member holding it) for member `name` of key."""
    from .model import RecordRef
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

    def line(self) -> str:
        sign = {"added": "+", "removed": "-"}.get(self.what, "~")
        detail = ""
        if self.what not in ("added", "removed"):
            detail = f": {_fmt(self.old)} -> {_fmt(self.new)}"
        flag = "  [breaking]" if self.breaking else ""
        return f"  {sign} {self.kind} {self.name}{' ' + self.what if sign == '~' else ''}{detail}{flag}"


def _fmt(v: object) -> str:
    if isinstance(v, int) and v > 9:
        return hex(v)
    if isinstance(v, tuple) and v and v[0] == "bits":
        return f"bits {v[1]}+{v[2]}"
    if isinstance(v, tuple) and len(v) == 2:
        return f"{v[0]}/{v[1]}"
    return repr(v)


@dataclass
class Report:
    old: str
    new: str
    arch: str
    changes: list[Change] = field(default_factory=list)

    @property
    def breaking(self) -> list[Change]:
        return [c for c in self.changes if c.breaking]

    def of(self, kind: str, what: str | None = None) -> list[Change]:
        return [c for c in self.changes if c.kind == kind and (what is None or c.what == what)]

    def to_json(self) -> dict:
        return {"old": self.old, "new": self.new, "arch": self.arch,
                "breaking": len(self.breaking),
                "changes": [{"kind": c.kind, "name": c.name, "what": c.what,
                             "old": _json(c.old), "new": _json(c.new), "breaking": c.breaking}
                            for c in self.changes]}

    def text(self) -> str:
        out = [f"KVM ABI diff for {self.arch}: {self.old} -> {self.new}"]
        for kind, title in (("type", "types"), ("field", "fields of surviving types"),
                            ("constant", "constants"), ("ioctl", "ioctls"),
                            ("capability", "capabilities")):
            cs = self.of(kind)
            counts = {}
            for c in cs:
                counts[c.what] = counts.get(c.what, 0) + 1
            summary = ", ".join(f"{n} {w}" for w, n in sorted(counts.items())) or "no change"
            out.append(f"{title}: {summary}")
            out += [c.line() for c in cs]
        verdict = (f"BREAKING: {len(self.breaking)} incompatible changes" if self.breaking
                   else "compatible: additions only")
        out.append(verdict)
        return "\n".join(out)


def _json(v: object) -> object:
    return list(v) if isinstance(v, tuple) else v


def compare(old: Snapshot, new: Snapshot, arch: str, removals_ok: bool = False) -> Report:
    r = Report(old.label, new.label, arch)
    removal_breaks = not removals_ok
    for name in sorted(new.types.keys() - old.types.keys()):
        r.changes.append(Change("type", name, "added", new=new.types[name]))
    for name in sorted(old.types.keys() - new.types.keys()):
        r.changes.append(Change("type", name, "removed", old=old.types[name], breaking=removal_breaks))
    for name in sorted(old.types.keys() & new.types.keys()):
        if old.types[name] != new.types[name]:
            r.changes.append(Change("type", name, "resized", old.types[name], new.types[name], True))
        of, nf = old.fields.get(name, {}), new.fields.get(name, {})
        for path in sorted(nf.keys() - of.keys()):
            r.changes.append(Change("field", f"{name}.{path}", "added", new=nf[path]))
        for path in sorted(of.keys() - nf.keys()):
            r.changes.append(Change("field", f"{name}.{path}", "removed", old=of[path],
                                    breaking=removal_breaks))
        for path in sorted(of.keys() & nf.keys()):
            if of[path] != nf[path]:
                r.changes.append(_field_change(name, path, of, nf, (name, path) in old.records))
    for kind, o, n, renamed in (("constant", old.constants, new.constants, "changed"),
                                ("ioctl", old.ioctls, new.ioctls, "renumbered")):
        for name in sorted(n.keys() - o.keys()):
            r.changes.append(Change(kind, name, "added", new=n[name]))
        for name in sorted(o.keys() - n.keys()):
            r.changes.append(Change(kind, name, "removed", old=o[name], breaking=removal_breaks))
        for name in sorted(o.keys() & n.keys()):
            if o[name] != n[name]:
                sentinel = kind == "constant" and name.endswith("_MAX")
                r.changes.append(Change(kind, name, renamed, o[name], n[name], not sentinel))
    caps = sorted(n for n in new.constants.keys() - old.constants.keys() if n.startswith("KVM_CAP_"))
    for name in caps:
        r.changes.append(Change("capability", name, "added", new=new.constants[name]))
    return r


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
