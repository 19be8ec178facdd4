"""Sphinx extension: the API reference and the ABI summary, written from the package.

Directives (each expands to reStructuredText that autodoc then fills in):

``.. kvm-top-level::``
    every name of kvm_bindings.__all__, documented as kvm_bindings.NAME. Where the
    host arch's class stands behind the name (kvm_bindings.Vm is kvm_bindings.x86.X86Vm
    on x86_64), the entry documents the arch-neutral class and says so; the arch class
    has its own entry on its arch's page, listing what it adds.
``.. kvm-module:: kvm_bindings.exits``
    a module's own public names; those kvm_bindings re-exports link to their entry
    there instead of being documented twice.
``.. kvm-abi-summary::``
    per arch of kvm_bindings.abi: kernel version, counts, the enum classes and
    their members, how to find a struct. Numbers are read from the generated
    modules at build time, never written into the docs by hand.

Docstrings are plain text, not reStructuredText: each is shown line for line, with
markup characters escaped, so that what the code says is what the page shows."""

from __future__ import annotations

import ctypes
import enum
import importlib
import inspect
import re
import types
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

PACKAGE = "kvm_bindings"
# The page that lists the enum classes' members (kvm-abi-summary).
ENUMS_ON_ABI_PAGE = "abi"
# Bases whose members are the language's, not ours.
FOREIGN_MODULES = ("builtins", "ctypes", "_ctypes", "enum", "abc", "typing")


# ---- what is public, and where it is documented ------------------------------

# kvm_bindings.__all__ as the package has it, before document_neutral_classes().
_ACTUAL: dict[str, Any] = {}


def actual() -> dict[str, Any]:
    if not _ACTUAL:
        pkg = importlib.import_module(PACKAGE)
        _ACTUAL.update({name: getattr(pkg, name) for name in pkg.__all__})
    return _ACTUAL


def top_level() -> dict[str, Any]:
    """kvm_bindings.__all__: each name with the object its entry documents. Kvm, Vm and Vcpu
    are the host arch's classes (kvm_bindings.x86.X86Vm on x86_64); their entry documents
    the arch-neutral class they extend, the nearest base with the public name, and the arch
    class has its own entry on its arch's page."""
    return {name: home(name, value) for name, value in actual().items()}


def document_neutral_classes(app: Sphinx) -> None:
    """autodoc documents what kvm_bindings.Vm is when it imports it, and a class whose
    __name__ is not the name it is documented under becomes an "alias of" line. So, in
    this build process only, kvm_bindings.Vm is set to the arch-neutral Vm."""
    pkg = importlib.import_module(PACKAGE)
    for name, value in top_level().items():
        if value is not actual()[name]:
            setattr(pkg, name, value)


def home(name: str, value: Any) -> Any:
    if isinstance(value, type):
        return next((c for c in value.__mro__ if c.__name__ == name), value)
    return value


def module_names(modname: str) -> list[str]:
    """A module's public names: its __all__, else what it defines under its own name."""
    mod = importlib.import_module(modname)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    own = []
    for name, value in vars(mod).items():
        if name.startswith("_") or getattr(value, "__name__", None) != name:
            continue    # private, or a module-level variable that happens to hold a class
        where = getattr(value, "__module__", None) or ""
        if where == modname or where.startswith(modname + "."):
            own.append(name)
    return own


def documented_classes(modules: list[str]) -> dict[type, str]:
    """Every class the reference documents, with the dotted name it is documented under."""
    out: dict[type, str] = {}
    for name, value in top_level().items():
        if isinstance(value, type):
            out[value] = f"{PACKAGE}.{name}"
    for modname in modules:
        mod = importlib.import_module(modname)
        for name in module_names(modname):
            value = getattr(mod, name)
            if isinstance(value, type) and value not in out:
                out[value] = f"{modname}.{name}"
    return out


def stop_at(cls: type, arch_modules: list[str]) -> list[str]:
    """Bases whose members this class's entry leaves out: Python's, and the classes with an
    entry of their own that users hold (kvm_bindings.__all__, the arch packages' classes).
    A helper base (a mixin) has its members shown on each class that inherits them."""
    own = {v for v in top_level().values() if isinstance(v, type)}
    for modname in arch_modules:
        mod = importlib.import_module(modname)
        own |= {v for n in module_names(modname) if isinstance(v := getattr(mod, n), type)}
    return sorted({b.__name__ for b in cls.__mro__[1:]
                   if b in own or b.__module__ in FOREIGN_MODULES})


def entry(path: str, value: Any, arch_modules: list[str], note: str = "") -> list[str]:
    if isinstance(value, type) and issubclass(value, enum.Enum) and \
            value.__module__.startswith(f"{PACKAGE}.abi"):
        return [f".. autoclass:: {path}", "   :show-inheritance:", "",
                f"   Its members, per arch, are listed on the :doc:`/{ENUMS_ON_ABI_PAGE}` page.", ""]
    if isinstance(value, type):
        return [f".. autoclass:: {path}", "   :members:", "   :undoc-members:",
                "   :show-inheritance:",
                f"   :inherited-members: {', '.join(stop_at(value, arch_modules))}", "",
                *([f"   {note}", ""] if note else [])]
    if isinstance(value, types.ModuleType):
        return [f"* :mod:`{value.__name__}`", ""]
    if callable(value):
        return [f".. autofunction:: {path}", ""]
    return [f".. autodata:: {path}", "   :no-value:" if isinstance(value, dict) else "", ""]


class _Generated(SphinxDirective):
    has_titles = False

    def emit(self, lines: list[str]) -> list[nodes.Node]:
        node = nodes.section() if self.has_titles else nodes.container()
        node.document = self.state.document
        content = StringList(lines, source=f"<{self.name} directive>")
        nested_parse_with_titles(self.state, content, node)
        return list(node.children)

    @property
    def arch_modules(self) -> list[str]:
        return list(self.env.config.kvm_docs_arch_modules)


class TopLevel(_Generated):
    """Every name in kvm_bindings.__all__, grouped by the module that defines it."""

    has_titles = True

    def run(self) -> list[nodes.Node]:
        groups: dict[str, list[str]] = {}
        for name, value in top_level().items():
            groups.setdefault(getattr(value, "__module__", PACKAGE), []).append(name)
        lines = [f".. module:: {PACKAGE}", "", f".. currentmodule:: {PACKAGE}", ""]
        for where in sorted(groups, key=_group_order):
            title = _group_title(where)
            lines += [title, "-" * len(title), ""]
            for name in groups[where]:
                value, host = top_level()[name], actual()[name]
                note = "" if value is host else (
                    f"On this host ``{PACKAGE}.{name}`` is "
                    f":class:`{host.__module__.rsplit('.', 1)[0]}.{host.__name__}`, which "
                    f"adds its arch's calls to the ones below.")
                lines += entry(f"{PACKAGE}.{name}", value, self.arch_modules, note)
        return self.emit(lines)


_GROUPS = ["system", "vm", "vcpu", "device", "memory", "exits", "errors", "stats", "abi"]


def _group_order(modname: str) -> tuple[int, str]:
    short = modname.removeprefix(PACKAGE + ".").split(".")[0].split("_")[0]
    return (_GROUPS.index(short) if short in _GROUPS else len(_GROUPS), modname)


def _group_title(modname: str) -> str:
    if modname.startswith(f"{PACKAGE}.abi"):
        return "Enums from the generated ABI"
    return f"From {modname}"


class Module(_Generated):
    """One module: its docstring, then its public names (re-exports point to their entry)."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        exported = {id(v): n for n, v in top_level().items()}
        mod = importlib.import_module(modname)
        lines = [f".. automodule:: {modname}", "", f".. currentmodule:: {modname}", ""]
        also = []
        for name in module_names(modname):
            value = getattr(mod, name)
            if id(value) in exported and isinstance(value, type):
                also.append(f":class:`{PACKAGE}.{exported[id(value)]}`")
                continue
            lines += entry(f"{modname}.{name}", value, self.arch_modules)
        if also:
            lines[4:4] = [f"Also defined here, and documented under :mod:`{PACKAGE}`: "
                          + ", ".join(also) + ".", ""]
        return self.emit(lines)


# ---- the ABI summary ---------------------------------------------------------

def abi_facts(arch: str) -> dict[str, Any]:
    mod = importlib.import_module(f"{PACKAGE}.abi.{arch}")
    enums_mod = importlib.import_module(f"{PACKAGE}.abi.{arch}_enums")
    facts: dict[str, Any] = {"kernel": mod.KERNEL_VERSION, "structs": 0, "unions": 0, "constants": 0,
                             "ioctls": len(mod.IOCTLS), "enums": {}}
    for name in mod.__all__:
        value = getattr(mod, name)
        if isinstance(value, type) and issubclass(value, ctypes.Union):
            facts["unions"] += 1
        elif isinstance(value, type) and issubclass(value, ctypes.Structure):
            facts["structs"] += 1
        elif isinstance(value, int) and not isinstance(value, bool):
            facts["constants"] += 1
    for name in enums_mod.__all__:
        facts["enums"][name] = getattr(enums_mod, name)
    return facts


def _value(member: enum.Enum, flag: bool) -> str:
    return f"{int(member.value):#x}" if flag else str(int(member.value))


class AbiSummary(_Generated):
    has_titles = True

    def run(self) -> list[nodes.Node]:
        abi = importlib.import_module(f"{PACKAGE}.abi")
        arches = list(abi.ARCHES)
        facts = {arch: abi_facts(arch) for arch in arches}
        lines = [".. module:: kvm_bindings.abi", "", ".. list-table:: The generated modules",
                 "   :header-rows: 1", "", "   * - arch", "     - module", "     - kernel headers",
                 "     - integer constants", "     - structs", "     - unions", "     - ioctls",
                 "     - enum classes (members)"]
        for arch in arches:
            f = facts[arch]
            members = sum(len(e) for e in f["enums"].values())
            lines += [f"   * - {arch}" + (" (this host)" if arch == abi.HOST_ARCH else ""),
                      f"     - ``{PACKAGE}.abi.{arch}``", f"     - Linux {f['kernel']}",
                      f"     - {f['constants']}", f"     - {f['structs']}", f"     - {f['unions']}",
                      f"     - {f['ioctls']}", f"     - {len(f['enums'])} ({members})"]
        lines += ["", "Integer constants are the headers' object-like macros and C enum values, "
                  "as plain ints; ioctls are the entries of each module's ``IOCTLS``.", ""]
        lines += self.struct_lookup(arches)
        lines += self.enum_tables(arches, facts)
        return self.emit(lines)

    def struct_lookup(self, arches: list[str]) -> list[str]:
        title = "Looking up a struct"
        lines = [title, "-" * len(title), "",
                 "Structs and unions keep their C names. ``kvm_bindings.abi.kvm_regs`` is this "
                 "host's; ``kvm_bindings.abi.arm64.kvm_regs`` is arm64's, importable on any host. "
                 "Each class's docstring names the C struct, the header and line it comes from, "
                 "and its size. Here is ``kvm_regs`` on each arch, as its docstring says:", "",
                 ".. code-block:: pycon", ""]
        for arch in arches:
            regs = getattr(importlib.import_module(f"{PACKAGE}.abi.{arch}"), "kvm_regs", None)
            if regs is not None:
                lines += [f"   >>> kvm_bindings.abi.{arch}.kvm_regs.__doc__",
                          f"   {regs.__doc__!r}"]
        run = importlib.import_module(f"{PACKAGE}.abi.{arches[0]}").IOCTLS.get("KVM_RUN")
        lines += [""]
        if run is not None:
            lines += ["Ioctls are ``Ioctl`` records with their number and argument type:", "",
                      ".. code-block:: pycon", "",
                      f"   >>> kvm_bindings.abi.{arches[0]}.IOCTLS['KVM_RUN']", f"   {run!r}", ""]
        return lines

    def enum_tables(self, arches: list[str], facts: dict[str, Any]) -> list[str]:
        title = "Enum classes"
        lines = [title, "-" * len(title), "",
                 "Each enum class drops the C prefix from its members' names "
                 "(``KVM_EXIT_IO`` is ``ExitReason.IO``). The same values are plain ints in "
                 "the arch module under their C names. ``kvm_bindings.Capability`` and "
                 "``kvm_bindings.ExitReason`` are this host's.", ""]
        names: list[str] = []
        for arch in arches:
            names += [n for n in facts[arch]["enums"] if n not in names]
        for name in names:
            have = [a for a in arches if name in facts[a]["enums"]]
            first = facts[have[0]]["enums"][name]
            flag = issubclass(first, enum.Flag)
            doc = " ".join((inspect.getdoc(first) or "").split())
            lines += [f".. _abi-enum-{name}:", "", name, "~" * len(name), "",
                      escape(doc), "", f"{'IntFlag' if flag else 'IntEnum'}, in "
                      + ", ".join(have) + ".", "",
                      ".. list-table::", "   :header-rows: 1", "", "   * - member", "     - value",
                      "     - only in"]
            members: list[str] = []
            for a in have:
                members += [m for m in facts[a]["enums"][name].__members__ if m not in members]
            for m in members:
                values = {a: _value(facts[a]["enums"][name][m], flag) for a in have
                          if m in facts[a]["enums"][name].__members__}
                same = len(set(values.values())) == 1
                shown = next(iter(values.values())) if same else \
                    ", ".join(f"{a}: {v}" for a, v in values.items())
                lines += [f"   * - ``{m}``", f"     - {shown}",
                          "     - " + (", ".join(values) if len(values) < len(have) else "")]
            lines.append("")
        return lines


# ---- plain-text docstrings ---------------------------------------------------

_MARKUP = re.compile(r"([\\*`|_\[\]])")


def escape(text: str) -> str:
    """Plain text to reStructuredText that renders as the same text."""
    return _MARKUP.sub(r"\\\1", text)


def plain_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                    lines: list[str]) -> None:
    """Render a docstring as the text it is: escape markup, keep its lines and paragraphs."""
    # Each source line is a line on the page (a line block keeps its indentation too);
    # blank lines still separate paragraphs.
    lines[:] = [f"| {escape(line.rstrip())}" if line.strip() else "" for line in lines]


# ---- links to names documented under another path -----------------------------

def resolve_elsewhere(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """kvm_bindings.vm.Vm (how annotations and bases spell it) -> kvm_bindings.Vm (its entry)."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith(PACKAGE + "."):
        return None
    documented = app.kvm_docs_documented  # type: ignore[attr-defined]
    parts = target.split(".")
    for i in range(len(parts), 1, -1):     # the class, or the class a member belongs to
        owner = _lookup(parts[:i])
        if isinstance(owner, type) and owner in documented:
            new = ".".join([documented[owner], *parts[i:]])
            if new == target:
                return None
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder,
                                                     node["reftype"], new, node, contnode)
    return None


def _lookup(parts: list[str]) -> Any:
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def remember_documented(app: Sphinx) -> None:
    app.kvm_docs_documented = documented_classes(list(app.config.kvm_docs_modules))  # type: ignore[attr-defined]


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.add_config_value("kvm_docs_modules", [], "env")
    app.add_config_value("kvm_docs_arch_modules", [], "env")
    app.add_directive("kvm-top-level", TopLevel)
    app.add_directive("kvm-module", Module)
    app.add_directive("kvm-abi-summary", AbiSummary)
    app.connect("builder-inited", document_neutral_classes)
    app.connect("builder-inited", remember_documented)
    app.connect("autodoc-process-docstring", plain_docstring)
    app.connect("missing-reference", resolve_elsewhere)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
