"""Bad input stops the generator with file:line and the offending text, and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

CASES = {
    "syntax_error": ("struct kvm_bad {\n\tint a;\n\tint b c;\n};\n",
                     "linux/kvm.h:3", "int b c;"),
    "unknown_type": ("struct kvm_bad {\n\tint a;\n\tmy_type_t x;\n};\n",
                     "linux/kvm.h:3", "unknown type name 'my_type_t'"),
    "unsupported_attribute": ("struct kvm_bad {\n\tint a __attribute__((deprecated));\n};\n",
                              "linux/kvm.h:2", "unsupported attribute 'deprecated'"),
    "missing_include": ("#include <linux/types.h>\n#include <linux/no_such_header.h>\n",
                        "linux/kvm.h:2", "linux/no_such_header.h"),
    "unevaluable_array_size": ("struct kvm_bad {\n\tint a[NOT_DEFINED];\n};\n",
                               "linux/kvm.h:2", "NOT_DEFINED"),
    "unbalanced_attribute": ("struct kvm_bad {\n\tint a __attribute__((aligned(8));\n};\n",
                             "linux/kvm.h:2", "__attribute__"),
    # Inputs that crashed the generator with a traceback or an error without a place.
    "deep_array_size": ("struct kvm_bad {\n\tint a[" + "(" * 3000 + "1" + ")" * 3000 + "];\n};\n",
                        "linux/kvm.h:2", "nested more than"),
    "deep_nested_structs": ("struct kvm_bad {\n" + "struct { " * 400 + "int x;" + " } a;" * 400
                            + "\n};\n", "linux/kvm.h:2", "struct { struct {"),
    "struct_contains_itself": ("struct kvm_bad {\n\tint a;\n\tstruct kvm_bad b;\n};\n",
                               "linux/kvm.h:3", "struct kvm_bad b;"),
    "static_assert_false_at_file_scope": ("struct s { int a; };\n_Static_assert(sizeof(struct s) == 8, "
                                          "\"s is 8\");\n", "linux/kvm.h:2", "_Static_assert"),
    "static_assert_false_in_struct": ("struct kvm_bad {\n\tint a;\n\t_Static_assert(0, \"no\");\n};\n",
                                      "linux/kvm.h:3", "static assertion failed"),
    "truncated": ("struct kvm_ok { int a; };\nstruct kvm_bad {\n\tint a;\n", "linux/kvm.h:3",
                  "int a;"),
    "kvm_run_comment_names_missing_member": (
        "#define KVM_EXIT_IO 2\nstruct kvm_run {\n\tunion {\n\t\t/* KVM_EXIT_IO */\n"
        "\t\tstruct { int port; } io;\n\t\t/* KVM_EXIT_MMIO */\n#if 0\n\t\tstruct { int addr; } mmio;\n"
        "#endif\n\t};\n};\n#define KVM_EXIT_MMIO 6\n", "linux/kvm.h:6", "KVM_EXIT_MMIO"),
    "probe_rejects_what_the_model_accepts": ("typedef int kvm_t;\ntypedef long kvm_t;\n",
                                             "linux/kvm.h:2", "typedef long kvm_t;"),
    "unnamed_bitfield_of_struct_type": ("struct t { int x; };\nstruct kvm_bad {\n\tstruct t : 3;\n};\n",
                                        "linux/kvm.h:3", "invalid type"),
    "pragma_pack": ("struct kvm_bad {\n#pragma pack(1)\n\tint a;\n};\n", "linux/kvm.h:2", "pragma"),
}
# What gcc rejects, the generator rejects too, whether or not it runs the probe.
GCC_REJECTS = {
    "duplicate_member": ("struct kvm_bad {\n\tint a;\n\tunion { int b; int a; };\n};\n",
                         "linux/kvm.h:3", "duplicate member 'a'"),
    "negative_array_size": ("struct kvm_bad {\n\tint a[1 - 2];\n};\n", "linux/kvm.h:2",
                            "int a[1 - 2];"),
    "bitfield_wider_than_its_type": ("typedef unsigned char __u8;\nstruct kvm_bad {\n\t__u8 a:9;\n};\n",
                                     "linux/kvm.h:3", "__u8 a:9;"),
    "huge_array": ("struct kvm_bad {\n\tchar a[0x7fffffffffffffff];\n};\n", "linux/kvm.h:2",
                   "char a[0x7fffffffffffffff];"),
}


def _generate(include: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codegen", "generate", "--include-dir", str(include),
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True)


def _header(tmp_path: Path, text: str | bytes) -> Path:
    inc = tmp_path / "inc"
    (inc / "linux").mkdir(parents=True)
    data = text if isinstance(text, bytes) else text.encode()
    (inc / "linux" / "kvm.h").write_bytes(data)
    return inc


ERROR_CASES = [(c, "facts") for c in sorted(CASES)] + \
    [(c, facts) for c in sorted(GCC_REJECTS) for facts in ("facts", "no-facts")]


@pytest.mark.parametrize("case, facts", ERROR_CASES, ids=[f"{c}-{f}" for c, f in ERROR_CASES])
def test_malformed_header_stops_with_location_and_text(case, facts, tmp_path, gcc, request):
    text, where, offending = CASES.get(case) or GCC_REJECTS[case]
    inc = _header(tmp_path, text)
    if case == "missing_include":   # give it a real linux/types.h so only the second include fails
        (tmp_path / "inc" / "linux" / "types.h").write_text("typedef unsigned int __u32;\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x86_64.py").write_text("previous output\n")

    proc = _generate(inc, out, *(["--no-facts"] if facts == "no-facts" else []))

    print(f"\n[{case}] {proc.stderr.strip()[:500]}")   # shown with pytest -s: what a user sees
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {where}: ")   # the place comes first
    assert offending in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing half-written: the previous output is untouched and nothing was added
    assert sorted(p.name for p in out.iterdir()) == ["x86_64.py"]
    assert (out / "x86_64.py").read_text() == "previous output\n"


def test_unknown_version_names_what_is_pinned():
    proc = subprocess.run([sys.executable, "-m", "codegen", "generate", "--version", "1.0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "1.0" in proc.stderr and "pinned" in proc.stderr


def test_unfetchable_source_names_version_source_and_remedy(tmp_path, monkeypatch):
    """A version whose pinned wheel the registry no longer serves fails with what to do."""
    from codegen import fetch, headers
    from codegen.errors import GeneratorError

    manifest = headers.load_manifest()
    entry = dict(manifest["versions"][headers.shipped_version()])
    entry["source"] = dict(entry["source"], version="0.0.0-no-such-release")
    manifest["versions"] = {"9.9.9": entry}
    monkeypatch.setattr(headers, "HEADERS_DIR", tmp_path)
    monkeypatch.setattr(fetch, "HEADERS_DIR", tmp_path)
    monkeypatch.setattr(fetch, "load_manifest", lambda: manifest)
    monkeypatch.setattr(fetch, "version_dir", lambda v: tmp_path / v)
    monkeypatch.setattr(fetch, "_pip_download", _refuse)
    with pytest.raises(GeneratorError) as err:
        fetch.fetch("9.9.9")
    message = str(err.value)
    assert "9.9.9" in message and "ziglang==0.0.0-no-such-release" in message
    assert "python -m codegen pin 9.9.9" in message
    assert not (tmp_path / "9.9.9").exists()


def _refuse(package: str, version: str, dest: Path) -> Path:
    from codegen.fetch import Unfetchable
    raise Unfetchable(f"could not download {package}=={version} from PyPI: no such version")


# Inputs gcc accepts that used to crash the generator or write a module that does not
# import: (header, the RENAMED entries expected, a check run in the imported module `m`).
ACCEPTED = {
    "ff_byte_in_comments": (b"/* \xff */\n#define KVM_EXIT_IO 2\nstruct kvm_run {\n\tunion {\n"
                            b"\t\t/* KVM_EXIT_IO \xfe */\n\t\tstruct { int port; } io;\n\t};\n};\n",
                            {}, "m.EXIT_MEMBERS == {'KVM_EXIT_IO': 'io'}"),
    "ff_byte_in_a_string": (b'#define KVM_S "a\xffb"\n#define KVM_T 1\n', {},
                            "m.KVM_T == 1 and any(u[0] == 'KVM_S' for u in m.UNEXPRESSED)"),
    "non_ascii_string": ('#define KVM_S "h\u00e9 \\x41"\n'.encode(), {}, "m.KVM_S == 'h\\u00e9 A'"),
    "multi_character_constant": (b"#define KVM_C 'ab'\n#define KVM_D '\\xff'\n", {},
                                 "m.KVM_D == -1 and any(u[0] == 'KVM_C' for u in m.UNEXPRESSED)"),
    "unnamed_members_declare_nothing": (b"struct kvm_s { int a; int; struct t { int b; }; "
                                        b"enum { E1 = 4 }; };\n", {},
                                        "m.ctypes.sizeof(m.kvm_s) == 4 and m.E1 == 4 and m.t"),
    "static_asserts_that_hold": (b"struct kvm_s { int a; _Static_assert(sizeof(int) == 4, \"x\"); };\n"
                                 b"_Static_assert(sizeof(struct kvm_s) == 4, \"y\");\n", {},
                                 "m.ctypes.sizeof(m.kvm_s) == 4"),
    "static_inline_function": (b"static inline int kvm_f(int x)\n{\n\treturn ({ int y = x; "
                               b"__asm__ volatile(\"nop\"); y; });\n}\nstruct kvm_s { int a; };\n", {},
                               "('kvm_f', 'function') in {u[:2] for u in m.UNEXPRESSED}"),
    "byte_array_after_bitfield": (b"struct kvm_s { unsigned int a:3, b:2; unsigned char c[3]; };\n", {},
                                  "m.kvm_s.c.offset == 1 and m.ctypes.sizeof(m.kvm_s) == 4"),
    "long_expression": (b"#define KVM_N (1" + b" + 1" * 3000 + b")\n#define KVM_M 2\n", {},
                        "m.KVM_M == 2 and any(u[0] == 'KVM_N' for u in m.UNEXPRESSED)"),
    "macro_named_import": (b"#define import 5\n", {"import": "import_"}, "m.import_ == 5"),
    "macro_named_ctypes": (b"#define ctypes 1\nstruct kvm_s { int a; };\n", {"ctypes": "ctypes_"},
                           "m.ctypes_ == 1 and m.kvm_s().a == 0"),
    "struct_class": (b"struct class { int a; };\n", {"struct class": "class_"},
                     "m.C_TYPES['struct class'] is m.class_"),
    "enum_member_lambda": (b"enum kvm_e { lambda = 1, mro = 2 };\n",
                           {"lambda": "lambda_", "KvmE.lambda": "lambda_", "KvmE.mro": "mro_"},
                           "m.lambda_ == 1 and m.mro == 2 and m.KvmE.lambda_ == 1 and m.KvmE.mro_ == 2"),
    "member_fields_": (b"struct kvm_s { int _fields_; int class; int class_; int from_buffer; };\n",
                       {"kvm_s._fields_": "_fields__", "kvm_s.class": "class__",
                        "kvm_s.from_buffer": "from_buffer_"},   # class_ is C's own class_
                       "m.kvm_s(1, 2, 3, 4).class__ == 2 and m.kvm_s.from_buffer_.offset == 12"),
    "names_the_module_uses": (b"#define RENAMED 1\n#define __name__ 2\n#define Capability 3\n"
                              b"#define KVM_CAP_None 4\nstruct _FlexibleStructure { int a; };\n",
                              {"RENAMED": "RENAMED_", "__name__": "__name___",
                               "Capability": "Capability_", "Capability.None": "None_",
                               "struct _FlexibleStructure": "_FlexibleStructure_"},
                              "m.RENAMED_ == 1 and m.Capability.None_ == 4"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_header_gives_a_module_that_imports(case, tmp_path, gcc):
    text, renamed, check = ACCEPTED[case]
    inc = _header(tmp_path, text)
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "__init__.py").write_text("")

    proc = _generate(inc, out)

    assert proc.returncode == 0, proc.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
         "import pkg.x86_64 as m, pkg.x86_64_enums; print(json.dumps(m.RENAMED)); "
         f"assert {check}, 'check failed'", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == renamed
