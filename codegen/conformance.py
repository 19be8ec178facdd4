"""Conformance: a generated ctypes module against the C compiler's facts.

Everything compared here comes from two sides that share no code: ctypes'
own view of the generated classes (sizeof, alignment, field descriptors) and
what gcc printed or rejected. Coverage is checked against gcc too: its -dM
macro list and the struct tags in its preprocessed output.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .arches import Arch
from .headers import HeaderSet
from .preprocess import DEFINES, compiler_for

_counter = itertools.count()


@dataclass
class Report:
    version: str
    arch: str
    counts: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return (f"{self.arch} Linux {self.version}: checked {counts}; "
                f"{len(self.mismatches)} mismatches")


def _py(cls, name: str) -> str:
    """The Python name of C member `name` of class cls, as the module's RENAMED says."""
    renamed = getattr(sys.modules[cls.__module__], "RENAMED", {})
    return renamed.get(f"{cls.__name__}.{name}", name)


def _member_type(t, name: str):
    """The ctypes type of member `name` of t, looking through anonymous members."""
    anonymous = getattr(t, "_anonymous_", ())
    for entry in t._fields_:
        if entry[0] == name:
            return entry[1], entry[2] if len(entry) > 2 else None
    for entry in t._fields_:
        if entry[0] in anonymous:
            found = _member_type(entry[1], name)
            if found is not None:
                return found
    return None


def resolve(cls, path: str):
    """(byte offset, ctypes type, bit offset or None, bit width or None) of a C member path."""
    offset, t, bit, width = 0, cls, None, None
    for part in re.findall(r"\[\d+\]|\w+", path):
        if part.startswith("["):
            t = t._type_
            offset += int(part[1:-1]) * ctypes.sizeof(t)
            continue
        py = _py(t, part)
        descr = getattr(t, py)
        found = _member_type(t, py)
        if found is None:
            raise KeyError(f"{t.__name__} has no member {part}")
        t, bits = found
        offset += descr.offset
        if bits is not None:
            if hasattr(descr, "bit_offset"):
                bit, width = descr.bit_offset, descr.bit_size
            else:  # before 3.14: size packs (width << 16) | bit offset
                bit, width = descr.size & 0xFFFF, descr.size >> 16
    return offset, t, bit, width


def set_bits(cls, path: str) -> tuple[int, int]:
    """Set one member to all ones in a zeroed instance: (first set bit, bits set).

    The same experiment the C probe runs, so no layout arithmetic is shared.
    """
    obj = cls()
    parts = re.findall(r"\[\d+\]|\w+", path)
    target = obj
    for part in parts[:-1]:
        target = target[int(part[1:-1])] if part.startswith("[") else \
            getattr(target, _py(type(target), part))
    setattr(target, _py(type(target), parts[-1]), -1)
    raw = int.from_bytes(bytes(obj), "little")
    if raw == 0:
        return -1, 0
    return (raw & -raw).bit_length() - 1, bin(raw).count("1")


def compare(mod: ModuleType, facts: dict, report: Report) -> None:
    bad = report.mismatches
    c = {"types": 0, "fields": 0, "bitfields": 0, "constants": 0, "ioctls": 0, "enum members": 0}
    for name, (size, align) in facts["types"].items():
        cls = mod.C_TYPES.get(name)
        c["types"] += 1
        if cls is None:
            bad.append(f"{name}: no ctypes class")
            continue
        got = (ctypes.sizeof(cls), max(ctypes.alignment(cls), getattr(cls, "_align_", 0)))
        if got != (size, align):
            bad.append(f"{name}: ctypes size/align {got}, C {(size, align)}")
    for root, paths in facts["member_types"].items():
        for path, (size, align) in paths.items():
            c["types"] += 1
            _, t, _, _ = resolve(mod.C_TYPES[root], path)
            got = (ctypes.sizeof(t), max(ctypes.alignment(t), getattr(t, "_align_", 0)))
            if got != (size, align):
                bad.append(f"{root} {path}: ctypes size/align {got}, C {(size, align)}")
    for root, paths in facts["fields"].items():
        for path, (offset, size) in paths.items():
            c["fields"] += 1
            try:
                got_off, t, _, _ = resolve(mod.C_TYPES[root], path)
            except (KeyError, AttributeError) as e:
                bad.append(f"{root}.{path}: {e}")
                continue
            if (got_off, ctypes.sizeof(t)) != (offset, size):
                bad.append(f"{root}.{path}: ctypes offset/size {(got_off, ctypes.sizeof(t))}, "
                           f"C {(offset, size)}")
    for root, paths in facts["bitfields"].items():
        for path, (bit, width) in paths.items():
            c["bitfields"] += 1
            got = set_bits(mod.C_TYPES[root], path)
            if got != (bit, width):
                bad.append(f"{root}.{path}: setting it to all ones in ctypes sets bits "
                           f"{got} (first, count), in C {(bit, width)}")
    for name, value in facts["constants"].items():
        c["constants"] += 1
        if getattr(mod, name, None) != value:
            bad.append(f"{name}: module has {getattr(mod, name, None)!r}, C has {value!r}")
    k = facts["constants"]
    if mod.IOCTLS:
        dirs = {k["_IOC_NONE"]: "none", k["_IOC_WRITE"]: "write", k["_IOC_READ"]: "read",
                k["_IOC_READ"] | k["_IOC_WRITE"]: "readwrite"}
    for name, io in mod.IOCTLS.items():
        c["ioctls"] += 1
        number = k.get(name)
        if io.number != number:
            bad.append(f"ioctl {name}: number {io.number:#x}, C {number!r}")
            continue
        direction = (number >> k["_IOC_DIRSHIFT"]) & k["_IOC_DIRMASK"]
        size = (number >> k["_IOC_SIZESHIFT"]) & k["_IOC_SIZEMASK"]
        if (io.direction, io.size) != (dirs[direction], size):
            bad.append(f"ioctl {name}: says {io.direction}/{io.size}, its number encodes "
                       f"{dirs[direction]}/{size}")
        if io.arg_type is not None and ctypes.sizeof(io.arg_type) != size:
            bad.append(f"ioctl {name}: argument {io.arg_c} is {ctypes.sizeof(io.arg_type)} bytes, "
                       f"the number encodes {size}")
    enums = importlib.import_module(mod.__name__ + "_enums")
    from codegen.families import FAMILIES
    c_names = {(key.split(".", 1)[0], py): key.split(".", 1)[1]
               for key, py in mod.RENAMED.items() if "." in key}
    for fam in FAMILIES:
        cls = getattr(enums, fam.name, None)
        # __members__, not iteration: iterating an IntFlag skips multi-bit members
        for py, member in (cls.__members__.items() if cls else ()):
            c["enum members"] += 1
            cname = fam.prefix + c_names.get((fam.name, py), py)
            if k.get(cname) != member.value:
                bad.append(f"{fam.name}.{py} = {member.value}, C {cname} = {k.get(cname)}")
            if fam.flag and (member.value <= 0 or member.value & (member.value - 1)):
                bad.append(f"{fam.name}.{py} = {member.value:#x} is not a single bit: "
                           f"a mask belongs in the exclusions in codegen/families.py")
    report.counts.update(c)


def check_coverage(mod: ModuleType, facts: dict, hs: HeaderSet, arch: Arch, report: Report) -> None:
    """Nothing silently dropped: gcc's own lists of macros and struct tags."""
    cc = compiler_for(arch)
    flags = ["-nostdinc", "-x", "c", "-"] + DEFINES + [f"-I{d}" for d in hs.include_dirs]

    def run(src: str, *extra: str) -> str:
        return subprocess.run([cc, "-E", *extra, *flags], input=src, capture_output=True,
                              text=True, check=True).stdout

    def macros(text: str) -> dict[str, str]:
        out = {}
        for line in text.splitlines():
            m = re.match(r"#define (\w+)(\(?)(.*)", line)
            if m:
                out[m.group(1)] = m.group(2) + m.group(3)
        return out

    base = macros(run("", "-dM"))
    mine = macros(run(hs.includes, "-dM"))
    unexpressed = {u[0]: u[1] for u in mod.UNEXPRESSED}
    n = 0
    for name, body in mine.items():
        if name in base and base[name] == body:
            continue
        n += 1
        if hasattr(mod, name) or name in mod.EMPTY_MACROS:
            continue
        if name in unexpressed:
            if unexpressed[name] == "function-like macro" and not body.startswith("("):
                bad = f"{name} is listed as function-like but gcc defines it object-like"
                report.mismatches.append(bad)
            continue
        report.mismatches.append(f"macro {name} is in the headers but not in the module")
    rejected = set(facts["rejected"])
    for name, kind in unexpressed.items():
        if kind == "macro" and name not in rejected:
            report.mismatches.append(f"{name} is listed as unevaluable but gcc evaluates it")
    report.counts["header macros"] = n
    text = run(hs.includes)
    tags = set(re.findall(r"\b((?:struct|union)\s+\w+)\s*\{", text))
    for tag in sorted(tags):
        if re.sub(r"\s+", " ", tag) not in mod.C_TYPES:
            report.mismatches.append(f"{tag} is defined in the headers but has no class")
    report.counts["struct/union tags"] = len(tags)
    check_membership(mod, facts, text, mine, report)


def check_membership(mod: ModuleType, facts: dict, text: str, macros: dict[str, str],
                     report: Report) -> None:
    """Each enum class holds exactly its family: the C enum's members as gcc's preprocessed
    text lists them, or every object-like macro (per gcc -dM) with the prefix that gcc
    evaluates to an int; minus the exclusions declared in codegen/families.py."""
    from codegen.families import FAMILIES
    enums = importlib.import_module(mod.__name__ + "_enums")
    c_names = {(key.split(".", 1)[0], py): key.split(".", 1)[1]
               for key, py in mod.RENAMED.items() if "." in key}
    k = facts["constants"]
    tagged: dict[str, list[str]] = {}
    anonymous: list[str] = []
    for tag, body in re.findall(r"\benum\s+(\w*)\s*\{([^}]*)\}", text):
        body = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))
        names = [m.split("=")[0].strip() for m in body.split(",") if m.strip()]
        if tag:
            tagged[tag] = names
        else:
            anonymous += names
    in_tagged = {n for names in tagged.values() for n in names}
    n = 0
    for fam in FAMILIES:
        if fam.enum is not None:
            expected = set(tagged.get(fam.enum, ()))
        else:
            expected = {name for name, body in macros.items()
                        if not body.startswith("(")} | set(anonymous)   # object-like
            expected = {name for name in expected - in_tagged
                        if name.startswith(fam.prefix) and isinstance(k.get(name), int)}
        expected = {name for name in expected if not fam.excludes(name)}
        cls = getattr(enums, fam.name, None)
        got = {fam.prefix + c_names.get((fam.name, m), m) for m in (cls.__members__ if cls else ())}
        n += len(got)
        for name in sorted(got - expected):
            report.mismatches.append(f"{fam.name} has {name}, which is not a member of its family")
        for name in sorted(expected - got):
            report.mismatches.append(f"{fam.name} lacks {name}, a member of its family")
    report.counts["enum membership"] = n


def load_generated(files: dict[str, str], arch: Arch) -> ModuleType:
    """Import a freshly generated set of files as a throwaway package."""
    from .pipeline import PLAIN_MODULE, SUPPORT_MODULE
    tmp = Path(tempfile.mkdtemp(prefix="kvmgen-"))
    pkg = f"kvmgen_check_{next(_counter)}"
    (tmp / pkg).mkdir()
    (tmp / pkg / "__init__.py").write_text("")
    for name, text in files.items():
        if name.startswith(arch.name) or name in (SUPPORT_MODULE, PLAIN_MODULE):
            (tmp / pkg / name).write_text(text)
    sys.path.insert(0, str(tmp))
    try:
        return importlib.import_module(f"{pkg}.{arch.name}")
    finally:
        sys.path.remove(str(tmp))


def run(hs: HeaderSet, arch: Arch) -> Report:
    """Generate one version x arch, probe it with gcc, and compare."""
    import json

    from .pipeline import generate
    files = generate(hs, arch, with_facts=True)
    facts = json.loads(files[f"{arch.name}_facts.json"])
    mod = load_generated(files, arch)
    report = Report(hs.version, arch.name)
    compare(mod, facts, report)
    check_coverage(mod, facts, hs, arch, report)
    return report
