"""The docs build with warnings as errors, and the reference has an entry for every public name."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from .conftest import REQUIRE_TOOLS, ROOT, need

DOCS = ROOT / "docs"
# The modules the reference has a page for, besides kvm_bindings itself.
ARCHES = ["x86", "arm64", "riscv64"]
MODULES = [*(f"kvm_bindings.{a}" for a in ARCHES), "kvm_bindings.memory", "kvm_bindings.exits",
           "kvm_bindings.errors", "kvm_bindings.stats", "kvm_bindings.device",
           "kvm_bindings.conformance", "kvm_bindings.testing"]
# Bases whose members are Python's, not ours.
FOREIGN = ("builtins", "ctypes", "_ctypes", "enum", "abc", "typing")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """docs/ built as HTML with -W (any warning fails the build), in a fresh directory."""
    need(importlib.util.find_spec("sphinx") is not None,
         "sphinx is not installed (pip install -e '.[docs]')", REQUIRE_TOOLS)
    out = tmp_path_factory.mktemp("docs") / "html"
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                        str(DOCS), str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"sphinx failed ({r.returncode}):\n{r.stderr}{r.stdout}"
    return out


def read_inventory(path: Path) -> dict[str, str]:
    """objects.inv (Sphinx inventory version 2) -> {dotted name: domain:role} for the py domain."""
    raw = path.read_bytes()
    header_end = 0
    for _ in range(4):      # four header lines, then zlib-compressed entries
        header_end = raw.index(b"\n", header_end) + 1
    assert raw.startswith(b"# Sphinx inventory version 2"), raw[:40]
    entries = {}
    line_re = re.compile(r"(.+?)\s+(\S+?:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)")
    for line in zlib.decompress(raw[header_end:]).decode().splitlines():
        m = line_re.fullmatch(line)
        if m and m[2].startswith("py:"):
            entries[m[1]] = m[2]
    return entries


def home(name: str) -> type:
    """The class kvm_bindings.<name> is documented as. Kvm, Vm and Vcpu are the host arch's
    classes (kvm_bindings.x86.X86Vm on x86_64): their entry is the arch-neutral class they
    extend, the nearest base with the public name; the arch class has its own entry."""
    import kvm_bindings

    return next(c for c in getattr(kvm_bindings, name).__mro__ if c.__name__ == name)


def arch_classes() -> dict[type, str]:
    """Every public class the arch packages (x86, arm64, riscv64) define, found by looking, each
    with the name users reach it by (kvm_bindings.x86.Name), which is where it must be documented."""
    out = {}
    for arch in ARCHES:
        pkg = importlib.import_module(f"kvm_bindings.{arch}")
        mods = [pkg] + [importlib.import_module(m.name)
                        for m in pkgutil.walk_packages(pkg.__path__, f"kvm_bindings.{arch}.")
                        if not any(p.startswith("_") for p in m.name.split("."))]
        for mod in mods:
            for name, value in vars(mod).items():
                if (isinstance(value, type) and not name.startswith("_") and value.__name__ == name
                        and value.__module__.startswith(f"kvm_bindings.{arch}")):
                    out.setdefault(value, f"kvm_bindings.{arch}.{name}")
    return out


def public_classes() -> dict[type, str]:
    """The classes whose members must all be listed: Kvm, Vm, Vcpu, Device and the arch classes."""
    out = {home(n): f"kvm_bindings.{n}" for n in ("Kvm", "Vm", "Vcpu", "Device")}
    for cls, path in arch_classes().items():
        out.setdefault(cls, path)
    return out


def exported_classes() -> dict[type, str]:
    """Classes with an entry of their own: kvm_bindings.__all__'s and the arch packages'."""
    import kvm_bindings

    out = {home(n): f"kvm_bindings.{n}" for n in kvm_bindings.__all__
           if isinstance(getattr(kvm_bindings, n), type)}
    for cls, path in arch_classes().items():
        out.setdefault(cls, path)
    return out


def member_entry(cls: type, path: str, name: str, exported: dict[type, str]) -> str | None:
    """Where the reference documents cls.name: on cls's own entry, or, if cls inherits it from
    another class of kvm_bindings.__all__, on that class's entry. None for Python's members."""
    for base in cls.__mro__:
        if base is not cls and base in exported:
            return member_entry(base, exported[base], name, exported)
        if base.__module__ in FOREIGN:
            return None
        if name in vars(base):
            return f"{path}.{name}"
    return None


def missing_entries(inventory: dict[str, str]) -> list[str]:
    """Every public name that should have an entry in the reference and has none."""
    import kvm_bindings

    want = [f"kvm_bindings.{n}" for n in kvm_bindings.__all__] + ["kvm_bindings", *MODULES]
    for arch in ARCHES:
        pkg = importlib.import_module(f"kvm_bindings.{arch}")
        want += [f"kvm_bindings.{arch}.{n}" for n in getattr(pkg, "__all__", ())]
        want += [f"kvm_bindings.{arch}.{n}" for n, v in vars(pkg).items()
                 if inspect.isfunction(v) and not n.startswith("_")
                 and v.__module__.startswith(f"kvm_bindings.{arch}")]   # mode helpers, reg ids
    exported = exported_classes()
    for cls, path in public_classes().items():
        want.append(path)
        for name in dir(cls):
            if not name.startswith("_"):
                where = member_entry(cls, path, name, exported)
                if where is not None:
                    want.append(where)
    return sorted({w for w in want if w not in inventory})


def test_docs_build_with_warnings_as_errors(built):
    assert (built / "index.html").is_file()
    for page in ("tutorial", "abi", "reference/kvm_bindings", *(f"reference/{a}" for a in ARCHES)):
        assert (built / f"{page}.html").is_file(), page


def test_every_public_name_and_method_has_an_entry(built):
    inventory = read_inventory(built / "objects.inv")
    assert missing_entries(inventory) == []


def test_the_check_notices_a_missing_entry(built):
    """The oracle can fail: drop entries from a real inventory and it names exactly those."""
    inventory = read_inventory(built / "objects.inv")
    dropped = ["kvm_bindings.Vcpu.run", "kvm_bindings.Vm.add_memory", "kvm_bindings.IoExit",
               "kvm_bindings.Kvm.create_vm"]
    for name in dropped:
        assert name in inventory, name
    assert missing_entries({k: v for k, v in inventory.items() if k not in dropped}) == sorted(dropped)


def test_a_method_without_an_entry_is_reported(built, monkeypatch):
    """A public method added to Vcpu that the built docs do not list is caught."""
    inventory = read_inventory(built / "objects.inv")
    monkeypatch.setattr(home("Vcpu"), "brand_new_call", lambda self: None, raising=False)
    assert missing_entries(inventory) == ["kvm_bindings.Vcpu.brand_new_call"]


def html_table_rows(html: str) -> list[list[str]]:
    """The cells of every table row, as text."""
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", html, re.S):
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        rows.append([re.sub(r"<[^>]+>", "", c).strip() for c in cells])
    return rows


def test_abi_page_numbers_come_from_the_modules(built):
    """The ABI summary states each arch's kernel version and counts as the modules have them."""
    import ctypes

    from kvm_bindings import abi

    page = (built / "abi.html").read_text()
    rows = html_table_rows(page)
    header = next(r for r in rows if r and r[0] == "arch")
    by_module = {r[header.index("module")]: dict(zip(header, r)) for r in rows if len(r) == len(header)}
    for arch in abi.ARCHES:
        mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
        row = by_module[f"kvm_bindings.abi.{arch}"]
        structs = [n for n in mod.__all__ if isinstance(v := getattr(mod, n), type)
                   and issubclass(v, ctypes.Structure)]
        assert row["kernel headers"] == f"Linux {mod.KERNEL_VERSION}", row
        assert row["ioctls"] == str(len(mod.IOCTLS)), row
        assert row["structs"] == str(len(structs)), row
    host = importlib.import_module(f"kvm_bindings.abi.{abi.HOST_ARCH or abi.ARCHES[0]}")
    members = {r[0] for r in rows if r}
    for member in host.ExitReason:
        assert member.name in members, member


README_CALLS = re.compile(r"<!-- calls: begin [^\n]*-->\n(.*?)<!-- calls: end -->", re.S)


def readme_calls(text: str) -> str | None:
    """The list of calls in README's runtime section, or None if the section has none."""
    runtime = text.partition("\n## The runtime\n")[2].partition("\n## ")[0]
    found = README_CALLS.search(runtime)
    return found.group(1) if found else None


def test_readme_lists_every_call_as_the_tables_render_it():
    """README's list of calls is what `python -m kvm_bindings calls --markdown` renders from
    the call tables: a call added to a table without its README line fails here."""
    from kvm_bindings import _calls
    from kvm_bindings.__main__ import call_tables

    listed = readme_calls((ROOT / "README.md").read_text())
    assert listed is not None, "README's runtime section has no <!-- calls: begin/end --> list"
    assert listed == _calls.markdown(call_tables()), (
        "README's list of calls differs from the call tables: put the output of "
        "`python -m kvm_bindings calls --markdown` between its markers")


def test_the_readme_check_notices_a_call_without_its_line():
    from kvm_bindings import _calls
    from kvm_bindings.__main__ import call_tables

    tables = call_tables()
    grown = dict(tables, x86_64=(*tables["x86_64"],
                                 _calls.Call("vcpu", "vcpu.made_up_call", ("KVM_MADE_UP",),
                                             "KVM_CAP_MADE_UP")))
    listed = readme_calls((ROOT / "README.md").read_text())
    assert listed != _calls.markdown(grown)
    assert "| `vcpu.made_up_call` | `KVM_MADE_UP` | `KVM_CAP_MADE_UP` | x86_64 |" in \
        _calls.markdown(grown)
    assert readme_calls("# x\n\n## The runtime\n\ntext\n\n## Next\n") is None


def test_a_call_several_arches_declare_alike_is_one_row_naming_them():
    from kvm_bindings import _calls

    call = _calls.Call("vcpu", "vcpu.inject_interrupt", ("KVM_INTERRUPT",), None)
    other = call._replace(capability="KVM_CAP_X")
    text = _calls.markdown({"all": (), "x86_64": (call,), "arm64": (other,), "riscv64": (call,)})
    assert "| `vcpu.inject_interrupt` | `KVM_INTERRUPT` | — | x86_64, riscv64 |" in text
    assert "| `vcpu.inject_interrupt` | `KVM_INTERRUPT` | `KVM_CAP_X` | arm64 |" in text
    assert text.count("vcpu.inject_interrupt") == 2
