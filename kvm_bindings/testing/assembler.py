"""Assemble GNU as source into flat guest bytes at test time, with errors shown at the source line.

The source runs through the C preprocessor and GNU as (`gcc -c`), so #include, #define
and the ucall macros of kvm_ucall.h work, and __FILE__/__LINE__ name the user's own
source; then `ld` links it flat (`--oformat binary`) at the base address. Needs gcc and
GNU binutils (as, ld) for x86_64: Debian/Ubuntu `apt install gcc binutils`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["INCLUDE_DIR", "TOOLS", "AssemblyError", "MissingToolError", "Mode", "SourceError",
           "assemble", "mode_bits"]

# Where kvm_ucall.h lives: `gcc -I INCLUDE_DIR` for a build of your own.
INCLUDE_DIR = Path(__file__).resolve().parent
# The programs assemble() runs.
TOOLS = ("gcc", "ld")
Mode = Literal["long", "protected", "real"]
_BITS = {"long": 64, "protected": 32, "real": 16}
_CODE = {64: ".code64", 32: ".code32", 16: ".code16"}
_TIMEOUT = 60
# AssemblyError's message shows this many errors at most, and .errors holds this many at most:
# a large garbage source makes one per line, hundreds of MB of output to parse.
_SHOWN_ERRORS = 20
_MAX_ERRORS = 1000
# Everything the guest has, in one output section from base: code, read-only data, data and
# zeroed bss, so the binary is exactly the guest's image with no page-aligned gaps.
_LINKER_SCRIPT = """\
SECTIONS {{
  . = {base:#x};
  .guest : {{ *(.text .text.*) *(.rodata .rodata.*) *(.data .data.*) *(.bss .bss.* COMMON) }}
  /DISCARD/ : {{ *(.note .note.* .comment .eh_frame) }}
}}
"""
# GNU as: "file:LINE: Error: text" and "file:LINE:  Info: macro invoked from here";
# cpp: "file:LINE:COLUMN: error: text".
_DIAGNOSTIC = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?:\d+:)?\s*(?P<kind>Error|Warning|Info|"
                         r"error|warning|fatal error|note): (?P<text>.*)$")


class MissingToolError(FileNotFoundError):
    """A program assemble() needs (gcc, ld) is not installed; the message names it."""


@dataclass(frozen=True)
class SourceError:
    """One assembler or preprocessor error, placed at a line of the user's source.

    For an error inside a macro (a ucall macro given a bad operand), line is where the
    source invoked the macro."""

    file: str
    line: int
    message: str


class AssemblyError(Exception):
    """The assembler, preprocessor or linker refused the source.

    errors lists each error at its source line; str() shows each with the lines around it."""

    def __init__(self, name: str, errors: list[SourceError], output: str, source: str) -> None:
        self.name = name
        self.errors = errors
        self.output = output
        super().__init__(_describe(name, errors, output, source))


def mode_bits(mode: Mode | int) -> int:
    """"long", "protected", "real" (or 64, 32, 16) -> the operand width in bits."""
    if isinstance(mode, int) and not isinstance(mode, bool) and mode in _CODE:
        return mode
    if isinstance(mode, str) and mode in _BITS:
        return _BITS[mode]
    raise ValueError(f"mode must be 'long', 'protected', 'real', 64, 32 or 16, not {mode!r}")


def assemble(source: str | os.PathLike[str], *, mode: Mode | int = "long", base: int = 0x1000,
             include_ucall: bool = True, name: str | None = None) -> bytes:
    """GNU as source (a string, or the path of a .S file) -> the guest's bytes, linked flat at base.

    mode sets the code width (.code64/.code32/.code16) and UCALL_BITS; include_ucall
    includes kvm_ucall.h first (GUEST_SYNC, GUEST_ASSERT_EQ, GUEST_DONE ...). Errors
    name the file and line: for a path, the path as given; for a string, name (default
    "<string>"), and __FILE__ in the guest is that name too. AssemblyError if the tools
    refuse the source (or take longer than a minute), MissingToolError if gcc or ld is not
    installed; TypeError for source bytes (decode them: a str is source text, never a path).
    """
    bits = mode_bits(mode)
    if not isinstance(base, int) or isinstance(base, bool) or not 0 <= base < 1 << 32:
        raise ValueError(f"base must be an int from 0 to below 4 GiB, not {base!r}")
    if name is not None and (not isinstance(name, str) or not name.isprintable()):
        raise ValueError(f"name must be printable text (it becomes the guest's __FILE__), not {name!r}")
    if isinstance(source, str):
        text, display, folder = source, name or "<string>", None
    elif isinstance(source, os.PathLike) and isinstance(os.fspath(source), str):
        path = Path(source)
        text, display = path.read_text(encoding="utf-8"), name or os.fspath(source)
        folder = path.resolve().parent
    else:
        raise TypeError(f"assemble() takes source text (str) or a path (os.PathLike), not "
                        f"{type(source).__name__}")
    if not display.isprintable():
        raise ValueError(f"the source's path must be printable text (it becomes the guest's "
                         f"__FILE__), not {display!r}")
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"the source is not valid Unicode text: {e}") from None
    tools = {tool: _find(tool) for tool in TOOLS}
    prelude = [f"#define UCALL_BITS {bits}"]
    if include_ucall:
        prelude.append('#include "kvm_ucall.h"')
    quoted = display.replace("\\", "\\\\").replace('"', '\\"')
    # #line: from here on, __LINE__, __FILE__ and every diagnostic are the user's own.
    wrapper = "\n".join([*prelude, ".text", _CODE[bits], f'#line 1 "{quoted}"', text, ""])
    with tempfile.TemporaryDirectory(prefix="kvm-bindings-asm-") as tmp:
        work = Path(tmp)
        (work / "guest.S").write_text(wrapper, encoding="utf-8")
        (work / "guest.ld").write_text(_LINKER_SCRIPT.format(base=base))
        includes = ["-I", str(INCLUDE_DIR)] + (["-I", str(folder)] if folder else [])
        _run([tools["gcc"], "-c", "-x", "assembler-with-cpp", *includes, "-o", str(work / "guest.o"),
              str(work / "guest.S")], work, display, text)
        _run([tools["ld"], "-m", "elf_x86_64", "-z", "noexecstack", "-e", f"{base:#x}", "-T",
              str(work / "guest.ld"), "--oformat", "binary", "-o", str(work / "guest.bin"),
              str(work / "guest.o")], work, display, text)
        return (work / "guest.bin").read_bytes()


def _find(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise MissingToolError(f"assemble() needs {tool!r}, which is not on PATH: install gcc and "
                               "GNU binutils (Debian/Ubuntu: apt install gcc binutils)")
    return found


def _run(cmd: list[str], cwd: Path, display: str, source: str) -> None:
    # TMPDIR=cwd: gcc's own temporary files (the preprocessed source) go into our directory,
    # which is removed however the run ends; a session of its own lets a timeout stop gcc's
    # children (as) too, not gcc alone.
    env = {**os.environ, "TMPDIR": str(cwd)}
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True, errors="replace",
                          start_new_session=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=_TIMEOUT)
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            if isinstance(e, subprocess.TimeoutExpired):
                raise AssemblyError(display, [], f"{Path(cmd[0]).name} did not finish within "
                                    f"{_TIMEOUT} s and was stopped", source) from None
            raise
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if proc.returncode != 0:
        output = (proc.stderr + proc.stdout).strip()
        raise AssemblyError(display, _errors(output, display), output, source)


def _errors(output: str, display: str) -> list[SourceError]:
    """Each error at the line of the user's source it comes from.

    GNU as follows an error inside a macro with "Info: macro invoked from here" lines, the
    last of them the invocation in the user's source; the error's own line is the macro's
    (in kvm_ucall.h, though as names it with the including file)."""
    errors: list[SourceError] = []
    for raw in output.splitlines():
        m = _DIAGNOSTIC.match(raw)
        if m is None:
            continue
        kind, where = m["kind"].lower(), (m["file"], int(m["line"]))
        if kind in ("error", "fatal error"):
            if len(errors) == _MAX_ERRORS:
                break
            errors.append(SourceError(where[0], where[1], m["text"].strip()))
        elif kind == "info" and errors and "invoked from here" in m["text"]:
            last = errors[-1]
            errors[-1] = SourceError(where[0], where[1], last.message)
    return [e for e in errors if e.file == display] or errors


def _describe(name: str, errors: list[SourceError], output: str, source: str) -> str:
    if not errors:
        shown = output if len(output) <= 8000 else f"{output[:8000]}\n... (all of it in .output)"
        return f"assembling {name} failed:\n{shown}"
    lines = source.splitlines()
    out = [f"assembling {name} failed:"]
    for e in errors[:_SHOWN_ERRORS]:
        out.append(f"{e.file}:{e.line}: {e.message}")
        if e.file != name:
            continue
        for n in range(max(1, e.line - 1), min(len(lines), e.line + 1) + 1):
            out.append(f"  {'>' if n == e.line else ' '} {n:4} | {lines[n - 1]}")
    if len(errors) > _SHOWN_ERRORS:
        more = "more" if len(errors) < _MAX_ERRORS else "or more"
        out.append(f"... and {len(errors) - _SHOWN_ERRORS} {more} errors (.errors holds the first "
                   f"{_MAX_ERRORS}, .output all the tools said)")
    return "\n".join(out)
