"""Stage 1: run the C preprocessor for one arch.

Returns the translation unit (line markers kept, so every item knows its
header and line), every macro the headers define with where it was defined,
and the expansion of each object-like macro as the preprocessor itself
produces it: macro evaluation starts from the compiler's own expansion.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from .arches import Arch
from .errors import GeneratorError
from .headers import HeaderSet

TOP_HEADER = "linux/kvm.h"
DEFINES = ["-D__signed__=signed", "-D__extension__="]
# Marker that stands for _IOC(dir, type, nr, size) in expansions, so an ioctl's
# parts survive expansion instead of being folded into one number.
IOC_MARKER = "__kvmgen_ioc"
_EXPAND_PREFIX = "__kvmgen_expand_"
_BUILTIN_FILES = {"<built-in>", "<command-line>", "<stdin>"}

_MARKER = re.compile(r'^# (\d+) "((?:[^"\\]|\\.)*)"')
_DEFINE = re.compile(r"^#define ([A-Za-z_]\w*)(\([^)]*\))?(?: (.*))?$")
_UNDEF = re.compile(r"^#undef ([A-Za-z_]\w*)")


@dataclass
class MacroDef:
    name: str
    params: str | None   # "(a,b)" for function-like macros, None for object-like
    body: str
    file: str
    line: int


@dataclass
class Preprocessed:
    tu: str                                    # translation unit, markers kept, defines blanked
    macros: dict[str, MacroDef]                # final definition of each header macro
    expansions: dict[str, str] = field(default_factory=dict)  # object-like macro -> expansion
    files: list[str] = field(default_factory=list)             # headers seen, relative paths


def _run(cc: str, source: str, flags: list[str], hs: HeaderSet) -> str:
    cmd = [cc, "-E", "-nostdinc", "-x", "c", "-"] + flags + DEFINES + \
          [f"-I{d}" for d in hs.include_dirs]
    # Header bytes that are not UTF-8 pass through as surrogate escapes, so a string
    # literal keeps its bytes and nothing fails to decode.
    proc = subprocess.run(cmd, input=source, capture_output=True, encoding="utf-8",
                          errors="surrogateescape")
    if proc.returncode != 0:
        raise _compiler_error(proc.stderr, hs)
    return proc.stdout


def _compiler_error(stderr: str, hs: HeaderSet) -> GeneratorError:
    """The preprocessor's first error as file:line plus the offending text."""
    for line in stderr.splitlines():
        m = re.match(r"^(.*?):(\d+):(?:\d+:)? (?:fatal )?error: (.*)$", line)
        if m:
            rel = hs.relpath(m.group(1))
            return GeneratorError(m.group(3), rel, int(m.group(2)),
                                  _source_line(hs, rel, int(m.group(2))))
    return GeneratorError(f"the preprocessor failed: {stderr.strip()}")


def _source_line(hs: HeaderSet, rel: str, line: int) -> str | None:
    for d in hs.include_dirs:
        p = d / rel
        if p.exists():
            lines = p.read_text(errors="replace").splitlines()
            return lines[line - 1] if 0 < line <= len(lines) else None
    return None


def compiler_for(arch: Arch) -> str:
    cc = arch.compiler()
    if cc is None:
        raise GeneratorError(f"no C compiler for {arch.name} found (tried "
                             f"{', '.join(('gcc',) + arch.cross_compilers)})")
    return cc


def preprocess(hs: HeaderSet, arch: Arch) -> Preprocessed:
    cc = compiler_for(arch)
    raw = _run(cc, hs.includes, ["-dD"], hs)
    tu_lines: list[str] = []
    macros: dict[str, MacroDef] = {}
    files: list[str] = []
    cur_file, cur_line = "<stdin>", 0
    for text in raw.split("\n"):
        m = _MARKER.match(text)
        if m:
            cur_line, path = int(m.group(1)), m.group(2)
            cur_file = path if path in _BUILTIN_FILES else hs.relpath(path)
            if cur_file not in _BUILTIN_FILES and cur_file not in files:
                files.append(cur_file)
            tu_lines.append(f'# {cur_line} "{cur_file}"' + text[m.end():])
            continue
        if text.startswith("#define ") or text.startswith("#undef "):
            d = _DEFINE.match(text)
            if cur_file not in _BUILTIN_FILES:
                if d:
                    macros[d.group(1)] = MacroDef(d.group(1), d.group(2), (d.group(3) or "").strip(),
                                                  cur_file, cur_line)
                else:
                    u = _UNDEF.match(text)
                    if u:
                        macros.pop(u.group(1), None)
            tu_lines.append("")  # keep line numbers in step with the header
        else:
            tu_lines.append(text)
        cur_line += 1
    pp = Preprocessed("\n".join(tu_lines), macros, files=files)
    pp.expansions = _expand(cc, hs, [m.name for m in macros.values()
                                     if m.params is None and m.body])
    return pp


def _expand(cc: str, hs: HeaderSet, names: list[str]) -> dict[str, str]:
    """Let the preprocessor expand each object-like macro on a line of its own."""
    src = [hs.includes,
           "#undef _IOC",
           f"#define _IOC(dir, type, nr, size) {IOC_MARKER}(dir, type, nr, size)"]
    src += [f"{_EXPAND_PREFIX}{i} {name}" for i, name in enumerate(names)]
    out = _run(cc, "\n".join(src) + "\n", [], hs)
    result: dict[str, str] = {}
    for text in out.split("\n"):
        if text.startswith(_EXPAND_PREFIX):
            idx, _, expansion = text[len(_EXPAND_PREFIX):].partition(" ")
            result[names[int(idx)]] = expansion.strip()
    return result
