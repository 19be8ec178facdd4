"""The oracle: a C program, compiled by the target's compiler against the same
headers, that prints what C says about every type, field, bitfield and constant.

Facts are keyed by C spelling ("struct kvm_run", field path "io.port"), never
by anything the generator computed, so comparing them with the ctypes module
checks the generator rather than restating it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
from pathlib import Path

from .errors import GeneratorError
from .headers import HeaderSet
from .layout import Layout
from .model import Array, Model, RecordRef, strip_aligned
from .preprocess import compiler_for


def members(model: Model, layout: Layout):
    """Every (root C type, field path, kind) the probe can name.

    kind is "field", "bitfield", "flexible" (a flexible array: no sizeof), or
    "record" (the path, with [0] for arrays, holds a record of anonymous type).

    Anonymous members are transparent in C paths; records of anonymous type are
    entered through the member that holds them (arrays through element [0]);
    named record types are checked as roots of their own.
    """
    for key, rec in model.records.items():
        if rec.c_name is None or rec.fields is None:
            continue
        yield from _walk(model, rec.c_name, key, "")


def _walk(model: Model, root: str, key: str, prefix: str):
    for f in model.records[key].fields or []:
        t = strip_aligned(f.type)
        if f.name is None:
            if isinstance(t, RecordRef):
                yield from _walk(model, root, t.key, prefix)
            continue
        path = prefix + f.name
        flexible = isinstance(t, Array) and t.length is None
        yield root, path, "bitfield" if f.bits is not None else "flexible" if flexible else "field"
        index = ""
        while isinstance(t, Array) and t.length:
            index += "[0]"
            t = strip_aligned(t.element)
        if isinstance(t, RecordRef) and model.records[t.key].c_name is None:
            yield root, path + index, "record"
            yield from _walk(model, root, t.key, path + index + ".")


class _Source:
    """The probe program: every question as a C expression in one table.

    Answers go into data the compiler lays out itself (static initializers), so
    the same object file answers whether it can run here (the host arch: main()
    prints the tables) or not (another arch: the tables are read from its ELF
    sections).
    """

    def __init__(self) -> None:
        self.values: list[str] = []            # C expressions, as unsigned long long
        self.keys: list[tuple] = []            # what each value answers
        self.negative: list[str] = []          # constants, each also asked: is it negative?
        self.bit_objects: list[tuple[str, str]] = []   # (root type, path set to all ones)
        self.strings: list[str] = []

    def value(self, key: tuple, expr: str) -> None:
        self.keys.append(key)
        self.values.append(f"(unsigned long long)({expr})")

    def render(self, includes: str) -> str:
        bits_members = "".join(f"    {root} b{i};\n" for i, (root, _) in enumerate(self.bit_objects))
        bits_init = ", ".join(f".b{i} = {{ .{path} = -1 }}" for i, (_, path) in
                              enumerate(self.bit_objects))
        str_members = "".join(f"    char s{i}[sizeof({n})];\n" for i, n in enumerate(self.strings))
        str_init = ", ".join(f".s{i} = {n}" for i, n in enumerate(self.strings))
        extra = []
        for i in range(len(self.bit_objects)):
            extra.append(f"offsetof(struct kvmgen_bits, b{i})")
        for i in range(len(self.strings)):
            extra.append(f"offsetof(struct kvmgen_strings, s{i})")
        values = self.values + extra
        return "\n".join([
            "#include <stddef.h>",
            includes.rstrip("\n"),
            '#define KVMGEN_DATA(name) __attribute__((used, section(".kvmgen." name)))',
            "struct kvmgen_bits {\n" + bits_members + "};",
            "struct kvmgen_strings {\n" + str_members + "};",
            "KVMGEN_DATA(\"values\") const unsigned long long kvmgen_values[] = {",
            "".join(f"    {v},\n" for v in values) + "    0 };",
            "KVMGEN_DATA(\"negative\") const unsigned char kvmgen_negative[] = {",
            "".join(f"    ({n}) < 0,\n" for n in self.negative) + "    0 };",
            f"KVMGEN_DATA(\"bits\") const struct kvmgen_bits kvmgen_bits = {{ {bits_init} }};",
            f"KVMGEN_DATA(\"strings\") const struct kvmgen_strings kvmgen_strings = {{ {str_init} }};",
            _MAIN,
        ])


_MAIN = """
#ifdef KVMGEN_MAIN
#include <stdio.h>
static void dump(const char *name, const void *data, size_t n)
{
    const unsigned char *p = data;
    printf("%s ", name);
    for (size_t i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\\n");
}
int main(void)
{
    dump("values", kvmgen_values, sizeof kvmgen_values);
    dump("negative", kvmgen_negative, sizeof kvmgen_negative);
    dump("bits", &kvmgen_bits, sizeof kvmgen_bits);
    dump("strings", &kvmgen_strings, sizeof kvmgen_strings);
    return 0;
}
#endif
"""


def probe_source(model: Model, layout: Layout) -> _Source:
    src = _Source()
    for rec in model.records.values():
        if rec.c_name and rec.fields is not None:
            n = rec.c_name
            src.value(("T", n, "size"), f"sizeof({n})")
            src.value(("T", n, "align"), f"_Alignof({n})")
    for root, path, kind in members(model, layout):
        member = f"((({root} *)0)->{path})"
        if kind == "bitfield":
            src.bit_objects.append((root, path))
        elif kind == "record":
            src.value(("M", root, path, "size"), f"sizeof{member}")
            src.value(("M", root, path, "align"), f"__alignof__{member}")
        else:
            src.value(("F", root, path, "offset"), f"offsetof({root}, {path})")
            src.value(("F", root, path, "size"), "0" if kind == "flexible" else f"sizeof{member}")
    names = [c.name for c in model.constants.values()]
    names += [n for e in model.enums for n, _ in e.members if n not in model.constants]
    for name in names:
        c = model.constants.get(name)
        if c is not None and isinstance(c.value, str):
            src.strings.append(name)
            continue
        src.value(("C", name), name)
        src.negative.append(name)
    return src


def _compile_flags(hs: HeaderSet) -> list[str]:
    return ["-std=gnu11", "-w", "-D__signed__=signed"] + [f"-I{d}" for d in hs.include_dirs]


def run_probe(model: Model, layout: Layout, hs: HeaderSet) -> dict:
    """Compile the probe with the target's compiler; run it on the host arch, or read
    its answers from the object file for another arch. Returns the facts."""
    arch = model.arch
    cc = compiler_for(arch)
    src = probe_source(model, layout)
    with tempfile.TemporaryDirectory() as tmp:
        c_file = Path(tmp) / "probe.c"
        c_file.write_text(src.render(hs.includes))
        if arch.is_host:
            exe = Path(tmp) / "probe"
            _compile(cc, hs, ["-DKVMGEN_MAIN", "-o", str(exe), str(c_file)])
            out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
            blobs = {name: bytes.fromhex(hexdata) for name, hexdata in
                     (line.split(" ", 1) for line in out.splitlines())}
            how = "compiled and ran"
        else:
            obj = Path(tmp) / "probe.o"
            _compile(cc, hs, ["-c", "-o", str(obj), str(c_file)])
            sections = elf_sections(obj.read_bytes())
            blobs = {name: sections.get(f".kvmgen.{name}", b"")
                     for name in ("values", "negative", "bits", "strings")}
            how = "compiled; answers read from the object file"
    return _facts(model, src, blobs, Path(cc).name, how, hs)


def _compile(cc: str, hs: HeaderSet, args: list[str]) -> None:
    proc = subprocess.run([cc, *_compile_flags(hs), *args], capture_output=True,
                          encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        from .preprocess import _compiler_error
        first = _compiler_error(proc.stderr, hs)
        if first.file:   # gcc's first error, where gcc says it is
            raise GeneratorError(f"the C probe did not compile with {Path(cc).name}: "
                                 f"{first.message}", first.file, first.line, first.text)
        raise GeneratorError(f"the C probe did not compile with {cc}:\n{proc.stderr[-3000:]}")


def _facts(model: Model, src: _Source, blobs: dict[str, bytes], compiler: str, how: str,
           hs: HeaderSet) -> dict:
    order = "<" if model.arch.byteorder == "little" else ">"
    raw = blobs["values"]
    values = struct.unpack(f"{order}{len(raw) // 8}Q", raw)
    facts: dict = {"arch": model.arch.name, "kernel": model.version, "compiler": compiler,
                   "probe": how, "types": {}, "member_types": {}, "fields": {}, "bitfields": {},
                   "constants": {}}
    negative = dict(zip(src.negative, blobs["negative"]))
    for key, value in zip(src.keys, values):
        kind = key[0]
        if kind == "T":
            facts["types"].setdefault(key[1], [0, 0])[key[2] == "align"] = value
        elif kind == "M":
            facts["member_types"].setdefault(key[1], {}).setdefault(key[2], [0, 0])[
                key[3] == "align"] = value
        elif kind == "F":
            facts["fields"].setdefault(key[1], {}).setdefault(key[2], [0, 0])[
                key[3] == "size"] = value
        else:
            facts["constants"][key[1]] = value - (1 << 64) if negative.get(key[1]) else value
    extra = values[len(src.keys):]
    sizes = facts["types"]
    for i, (root, path) in enumerate(src.bit_objects):
        start, size = extra[i], sizes[root][0]
        raw_bits = int.from_bytes(blobs["bits"][start:start + size], model.arch.byteorder)
        first = (raw_bits & -raw_bits).bit_length() - 1 if raw_bits else -1
        facts["bitfields"].setdefault(root, {})[path] = [first, bin(raw_bits).count("1")]
    offsets = list(extra[len(src.bit_objects):len(src.bit_objects) + len(src.strings)])
    offsets.append(len(blobs["strings"]))
    for i, name in enumerate(src.strings):
        facts["constants"][name] = blobs["strings"][offsets[i]:offsets[i + 1]].split(b"\0")[0].decode()
    facts["rejected"] = rejected_macros(model, hs)
    return facts


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents, from an ELF64 object (either byte order)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GeneratorError("the probe object is not a 64-bit ELF file")
    o = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(o + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(o + "HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(o + "IIQQQQ", data,
                                                                     shoff + i * shentsize)
        return name, _type, offset, size

    _, _, str_off, str_size = header(shstrndx)
    names = data[str_off:str_off + str_size]
    out = {}
    for i in range(shnum):
        name, sh_type, offset, size = header(i)
        label = names[name:names.index(b"\0", name)].decode()
        out[label] = b"" if sh_type == 8 else data[offset:offset + size]   # SHT_NOBITS
    return out


def rejected_macros(model: Model, hs: HeaderSet) -> list[str]:
    """Of the macros the model could not evaluate, those the compiler rejects too.

    One compile each: after a syntax error gcc's recovery can swallow the next
    lines, so a shared file would under-report.
    """
    from concurrent.futures import ThreadPoolExecutor

    cc = compiler_for(model.arch)
    flags = _compile_flags(hs)

    def rejected(name: str) -> bool:
        src = f"{hs.includes}long long kvmgen_value = (long long)({name});\n"
        proc = subprocess.run([cc, *flags, "-fsyntax-only", "-x", "c", "-"], input=src,
                              capture_output=True, encoding="utf-8", errors="replace")
        return proc.returncode != 0

    names = sorted(s.name for s in model.skipped if s.kind == "macro")
    with ThreadPoolExecutor(max_workers=4) as pool:
        return [n for n, bad in zip(names, pool.map(rejected, names)) if bad]


def facts_json(facts: dict) -> str:
    from . import GENERATOR_VERSION
    stamped = {"_generated": f"by kvm-bindings codegen {GENERATOR_VERSION} from the C probe's "
                             f"output -- DO NOT EDIT", **facts}
    return json.dumps(stamped, indent=1, sort_keys=True) + "\n"
