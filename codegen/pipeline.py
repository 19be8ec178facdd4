"""The stages put together: headers -> model -> rendered files."""

from __future__ import annotations

import filecmp
import os
import re
import tempfile
from pathlib import Path

from pycparser import c_ast, c_generator

from . import parse, preprocess
from .arches import ARCHES, SHIPPED_ARCHES, Arch
from .errors import GeneratorError
from .evaluate import Evaluator, Unevaluable
from .headers import ROOT, HeaderSet, sha256_file
from .layout import Layout
from .model import Builder, Constant, Ioctl, Model, Skipped

ABI_DIR = ROOT / "kvm_bindings" / "abi"
# The helpers every arch module imports (relatively, so an --out package carries its own):
# part of every arch's files, so each generated folder has them and `check` compares them.
SUPPORT_MODULE = "_support.py"   # struct bases, flexible arrays, bitfields, Ioctl
PLAIN_MODULE = "_plain.py"       # to_dict() and from_dict(), built on _support


class _EvalTypes:
    """Resolves a Typename inside a macro expansion against the model, never adding to it."""

    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    def __call__(self, tn: c_ast.Typename):
        for node in _walk(tn):
            if isinstance(node, (c_ast.Struct, c_ast.Union)) and node.decls is None:
                rec = self.builder.m.records.get(node.name)
                if rec is None or rec.fields is None or node.name in self.builder.defining:
                    kind = "struct" if isinstance(node, c_ast.Struct) else "union"
                    raise Unevaluable(f"names {kind} {node.name}, which these headers do not "
                                      f"define for {self.builder.m.arch.name}")
            if isinstance(node, c_ast.IdentifierType):
                n = " ".join(node.names)
                if len(node.names) == 1 and n not in self.builder.m.typedefs and \
                        n not in ("int", "char", "long", "short", "void", "unsigned", "signed"):
                    raise Unevaluable(f"names the type {n}, which these headers do not define")
        try:
            return self.builder.type_of(tn, owner=None, hint=None)
        except GeneratorError as e:
            raise Unevaluable(e.message) from None


def _walk(node):
    yield node
    for _, child in node.children():
        yield from _walk(child)


def build_model(hs: HeaderSet, arch: Arch) -> tuple[Model, Layout]:
    pp = preprocess.preprocess(hs, arch)

    def source_line(file: str, line: int) -> str | None:
        return preprocess._source_line(hs, file, line)

    parsed = parse.parse(pp, source_line)
    model = Model(arch, hs.version, hs.source)
    for header, why in hs.left_out:
        # an extra header these headers cannot provide: no type or constant from it, and why
        model.skipped.append(Skipped(header, "header", f"left out: {why}", header, 0))
    for rel in pp.files:
        for d in hs.include_dirs:
            if (d / rel).exists():
                model.files[rel] = sha256_file(d / rel)
                break
    layout = Layout(model)
    evaluator = Evaluator(model, layout)

    def strict_eval(node):
        try:
            return evaluator(node)
        except Unevaluable as e:
            coord = node.coord
            raise GeneratorError(f"cannot evaluate: {e}", coord.file if coord else None,
                                 coord.line if coord else None,
                                 source_line(coord.file, coord.line) if coord else None) from None

    builder = Builder(model, parsed, lambda m: strict_eval)
    builder.on_complete = layout.record   # each record laid out once its members are known
    evaluator.type_of = _EvalTypes(builder)
    builder.build()
    _check_layouts(model, layout)
    _macros(model, pp, evaluator, builder)
    _exit_members(model, hs)
    _ioctl_notes(model, hs)
    return model, layout


def _ioctl_notes(model: Model, hs: HeaderSet) -> None:
    """Each ioctl's fd kinds and gating capability, as kvm.h's comments say (comments.py)."""
    from .comments import ioctl_notes
    top = next((d / preprocess.TOP_HEADER for d in hs.include_dirs
                if (d / preprocess.TOP_HEADER).exists()), None)
    if top is None:
        return
    notes = ioctl_notes(top.read_text(errors="replace"))
    for io in model.ioctls.values():
        note = notes.get(io.name)
        if io.file == preprocess.TOP_HEADER and note is not None and note["line"] == io.line:
            io.fd = note["fd"]                  # type: ignore[assignment]
            io.capability = note["capability"]  # type: ignore[assignment]


def _exit_members(model: Model, hs: HeaderSet) -> None:
    from .comments import exit_members
    top = next((d / preprocess.TOP_HEADER for d in hs.include_dirs
                if (d / preprocess.TOP_HEADER).exists()), None)
    run = model.records.get("kvm_run")
    if top is None or run is None:
        return
    names = _member_names(model, "kvm_run")
    for reason, (member, line) in exit_members(top.read_text(errors="replace")).items():
        if member not in names:
            raise GeneratorError(f"a comment in struct kvm_run names {reason} for member "
                                 f"{member!r}, which kvm_run does not have",
                                 preprocess.TOP_HEADER, line)
        if reason in model.constants:
            model.exit_members[reason] = member


def _member_names(model: Model, key: str) -> set[str]:
    out = set()
    for f in model.records[key].fields or []:
        if f.name is None:
            from .model import RecordRef
            if isinstance(f.type, RecordRef):
                out |= _member_names(model, f.type.key)
        else:
            out.add(f.name)
    return out


def _check_layouts(model: Model, layout: Layout) -> None:
    for key, rec in model.records.items():
        if rec.fields is None:
            model.skipped.append(Skipped(rec.c_name or key, "type",
                                         "declared but never defined: it has no layout",
                                         rec.file, rec.line))
        else:
            layout.record(key)


def _macros(model: Model, pp: preprocess.Preprocessed, ev: Evaluator, builder: Builder) -> None:
    exprs, bad = parse.parse_expressions(pp.expansions, list(model.typedefs))
    gen = c_generator.CGenerator()
    directions = {}
    for name, m in pp.macros.items():
        model.macro_order.append(name)
        if m.params is not None:
            model.skipped.append(Skipped(name, "function-like macro",
                                         "takes arguments; the macros that use it are expanded",
                                         m.file, m.line))
            continue
        if not m.body:
            model.empty_macros.append(name)
            continue
        if name in bad:
            model.skipped.append(Skipped(name, "macro", bad[name], m.file, m.line))
            continue
        ev.ioc = None
        try:
            v = ev.eval(exprs[name])
        except Unevaluable as e:
            model.skipped.append(Skipped(name, "macro", str(e), m.file, m.line))
            continue
        root = exprs[name]
        model.constants[name] = Constant(name, v.value, v.type, m.file, m.line,
                                         hex=ev.ioc is not None or "0x" in m.body.lower())
        if ev.ioc is not None and isinstance(root, c_ast.FuncCall):
            if not directions:
                directions = {_value(model, k): d for k, d in
                              (("_IOC_NONE", "none"), ("_IOC_WRITE", "write"),
                               ("_IOC_READ", "read"))}
                directions[_value(model, "_IOC_READ") | _value(model, "_IOC_WRITE")] = "readwrite"
            ioc = ev.ioc
            arg_type = ev.type_of(ioc.arg) if ioc.arg is not None else None
            model.ioctls[name] = Ioctl(name, int(v.value), directions[ioc.dir], ioc.type, ioc.nr,
                                       ioc.size, arg_type,
                                       gen.visit(ioc.arg) if ioc.arg is not None else None,
                                       m.file, m.line)


def _value(model: Model, name: str) -> int:
    c = model.constants.get(name)
    if c is None or not isinstance(c.value, int):
        raise GeneratorError(f"{name} is needed to decode ioctl directions but is not defined")
    return c.value


def generate(hs: HeaderSet, arch: Arch, with_facts: bool = True) -> dict[str, str]:
    """Every file of one arch's bindings: {file name: text}."""
    try:
        return _generate(hs, arch, with_facts)
    except GeneratorError as e:
        if e.file and e.line and e.text is None:
            e.text = preprocess._source_line(hs, e.file, e.line)
        raise
    except RecursionError:
        # Nesting is bounded where it is parsed; this is the backstop.
        raise GeneratorError("the headers nest too deeply for the generator",
                             preprocess.TOP_HEADER, 1) from None


def _generate(hs: HeaderSet, arch: Arch, with_facts: bool) -> dict[str, str]:
    from . import render
    model, layout = build_model(hs, arch)
    files = {f"{arch.name}.py": render.render_module(model, layout),
             f"{arch.name}_enums.py": render.render_enums(model),
             SUPPORT_MODULE: render.render_support(),
             PLAIN_MODULE: render.render_plain()}
    if with_facts:
        from . import probe
        files[f"{arch.name}_facts.json"] = probe.facts_json(probe.run_probe(model, layout, hs))
    return files


def package_init(arches, version: str | None = None, source: str | None = None) -> dict[str, str]:
    """The package's __init__.py: the shipped kernel's, or that of the headers given."""
    from . import headers, render
    if version is None:
        version = headers.shipped_version()
        source = headers.describe_source(headers.load_manifest()["versions"][version]["source"])
    return {"__init__.py": render.render_init(arches, version, source or version)}


def write_files(out: Path, files: dict[str, str]) -> None:
    """Write all files or none: each goes to a temp file first, then all are renamed."""
    out.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            staged.append((tmp, out / name))
    except BaseException:
        for tmp, _ in staged:
            os.unlink(tmp)
        raise
    for tmp, dest in staged:
        os.replace(tmp, dest)


def check() -> list[str]:
    """Regenerate into a temp dir; list every committed file that differs."""
    from . import headers
    files: dict[str, str] = {}
    for name in SHIPPED_ARCHES:
        arch = ARCHES[name]
        files.update(generate(headers.from_manifest(headers.shipped_version(), arch), arch))
    files.update(package_init(SHIPPED_ARCHES))
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), files)
        for name in sorted(files):
            committed = ABI_DIR / name
            if not committed.exists():
                diffs.append(f"missing: kvm_bindings/abi/{name}")
            elif not filecmp.cmp(committed, Path(tmp) / name, shallow=False):
                diffs.append(f"differs: kvm_bindings/abi/{name}")
    for p in sorted(ABI_DIR.glob("*")):
        if p.is_file() and p.name not in files and re.search(r"\.(py|json)$", p.name):
            diffs.append(f"not generated: kvm_bindings/abi/{p.name}")
    return diffs
