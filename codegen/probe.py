"""The oracle: a C program, compiled by the target's compiler against the same
headers, that prints what C says about every type, field, bitfield and constant.

Facts are keyed by C spelling ("struct kvm_run", field path "io.port"), never
by anything the generator computed, so comparing them with the ctypes module
checks the generator rather than restating it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from .errors import GeneratorError
from .headers import HeaderSet
from .layout import Layout
from .model import Array, Model, RecordRef, strip_aligned
from .preprocess import TOP_HEADER, compiler_for

_PRELUDE = f"""\
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <{TOP_HEADER}>

static void kvmgen_bits(const char *type, const char *path, const void *obj, size_t n)
{{
    const unsigned char *p = obj;
    long first = -1, count = 0;
    for (size_t i = 0; i < n * 8; i++) {{
        if (p[i / 8] >> (i % 8) & 1) {{
            if (first < 0)
                first = (long)i;
            count++;
        }}
    }}
    printf("B\\t%s\\t%s\\t%ld\\t%ld\\n", type, path, first, count);
}}

#define KVMGEN_C(name, x) do {{ \\
    if ((x) < 0) printf("C\\t%s\\t%lld\\n", name, (long long)(x)); \\
    else printf("C\\t%s\\t%llu\\n", name, (unsigned long long)(x)); }} while (0)
#define KVMGEN_S(name, x) printf("S\\t%s\\t%s\\n", name, x)
"""


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


def probe_source(model: Model, layout: Layout) -> str:
    lines = [_PRELUDE, "int main(void)", "{"]
    for _key, rec in model.records.items():
        if rec.c_name and rec.fields is not None:
            n = rec.c_name
            lines.append(f'    printf("T\\t%s\\t%zu\\t%zu\\n", "{n}", sizeof({n}), _Alignof({n}));')
    for root, path, kind in members(model, layout):
        if kind == "bitfield":
            lines.append(f"    {{ {root} v; memset(&v, 0, sizeof v); v.{path} = -1; "
                         f'kvmgen_bits("{root}", "{path}", &v, sizeof v); }}')
        elif kind == "record":
            member = f"((({root} *)0)->{path})"
            lines.append(f'    printf("M\\t%s\\t%s\\t%zu\\t%zu\\n", "{root}", "{path}", '
                         f"sizeof{member}, __alignof__{member});")
        else:
            size = "0" if kind == "flexible" else f"sizeof((({root} *)0)->{path})"
            lines.append(f'    printf("F\\t%s\\t%s\\t%zu\\t%zu\\n", "{root}", "{path}", '
                         f"offsetof({root}, {path}), (size_t){size});")
    for c in model.constants.values():
        macro = "KVMGEN_S" if isinstance(c.value, str) else "KVMGEN_C"
        lines.append(f'    {macro}("{c.name}", {c.name});')
    for e in model.enums:
        for name, _ in e.members:
            if name not in model.constants:
                lines.append(f'    KVMGEN_C("{name}", {name});')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _compile_flags(hs: HeaderSet) -> list[str]:
    return ["-std=gnu11", "-w", "-D__signed__=signed"] + [f"-I{d}" for d in hs.include_dirs]


def run_probe(model: Model, layout: Layout, hs: HeaderSet) -> dict:
    """Compile and run the probe on this host; return its facts."""
    arch = model.arch
    if not arch.is_host:
        raise GeneratorError(f"the {arch.name} probe cannot run on this host")
    cc = compiler_for(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        exe = Path(tmp) / "probe"
        src.write_text(probe_source(model, layout))
        proc = subprocess.run([cc, *_compile_flags(hs), "-o", str(exe), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise GeneratorError(f"the C probe did not compile:\n{proc.stderr[-3000:]}")
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    facts: dict = {"arch": arch.name, "kernel": model.version, "compiler": Path(cc).name,
                   "types": {}, "member_types": {}, "fields": {}, "bitfields": {},
                   "constants": {}}
    for line in out.splitlines():
        kind, *rest = line.split("\t")
        if kind == "T":
            facts["types"][rest[0]] = [int(rest[1]), int(rest[2])]
        elif kind == "F":
            facts["fields"].setdefault(rest[0], {})[rest[1]] = [int(rest[2]), int(rest[3])]
        elif kind == "M":
            facts["member_types"].setdefault(rest[0], {})[rest[1]] = [int(rest[2]), int(rest[3])]
        elif kind == "B":
            facts["bitfields"].setdefault(rest[0], {})[rest[1]] = [int(rest[2]), int(rest[3])]
        elif kind == "C":
            facts["constants"][rest[0]] = int(rest[1])
        elif kind == "S":
            facts["constants"][rest[0]] = rest[1]
    facts["rejected"] = rejected_macros(model, hs)
    return facts


def rejected_macros(model: Model, hs: HeaderSet) -> list[str]:
    """Of the macros the model could not evaluate, those the compiler rejects too.

    One compile each: after a syntax error gcc's recovery can swallow the next
    lines, so a shared file would under-report.
    """
    from concurrent.futures import ThreadPoolExecutor

    cc = compiler_for(model.arch)
    flags = _compile_flags(hs)

    def rejected(name: str) -> bool:
        src = f"#include <{TOP_HEADER}>\nlong long kvmgen_value = (long long)({name});\n"
        proc = subprocess.run([cc, *flags, "-fsyntax-only", "-x", "c", "-"], input=src,
                              capture_output=True, text=True)
        return proc.returncode != 0

    names = sorted(s.name for s in model.skipped if s.kind == "macro")
    with ThreadPoolExecutor(max_workers=4) as pool:
        return [n for n, bad in zip(names, pool.map(rejected, names)) if bad]


def facts_json(facts: dict) -> str:
    return json.dumps(facts, indent=1, sort_keys=True) + "\n"
